"""Actions on data: drop, reweight, relabel, repair, and the retrain loop."""
