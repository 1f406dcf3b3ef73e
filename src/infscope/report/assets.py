"""The report's inline stylesheet and script.

Kept as Python strings (not package data files) so they ship with any install of the package and
are inlined into every report: the HTML file needs no network and no files beside it.

The script is vanilla JavaScript. It filters the flagged-rows table by method and noise family
(two select boxes), sorts any ``table.sortable`` by a clicked header, and keeps the filter in the
URL hash (``#method=loss&family=grammar``), applied on load and on ``hashchange``. When done it sets
``data-ready`` on ``<body>`` so a headless browser can tell that scripts ran.
"""

from __future__ import annotations

CSS = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 0 18px 40px; color: #222; }
h1 { font-size: 1.5em; margin: 18px 0 4px; }
h2 { font-size: 1.2em; margin-top: 34px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; font-size: 0.9em; }
.warning { background: #fff4e5; border-left: 4px solid #f0a030; padding: 6px 10px; margin: 6px 0; }
table { border-collapse: collapse; font-size: 0.88em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 7px; vertical-align: top; text-align: left; }
th { background: #f4f6f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; font-size: 0.7em; }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; font-size: 0.7em; }
.charts { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
.chart { background: #fff; border: 1px solid #eee; }
.cell-text { max-width: 360px; max-height: 9em; overflow: auto; white-space: pre-wrap; word-break: break-word; }
del { background: #ffd7d5; color: #8a1c1c; text-decoration: line-through; }
ins { background: #d4f8d4; color: #1b5e20; text-decoration: none; }
.tok { color: inherit; border-radius: 2px; padding: 0 1px; }
.tok-1 { background: rgba(230, 120, 0, 0.15); }
.tok-2 { background: rgba(230, 120, 0, 0.3); }
.tok-3 { background: rgba(230, 120, 0, 0.45); }
.tok-4 { background: rgba(230, 120, 0, 0.6); }
.tok-5 { background: rgba(230, 120, 0, 0.8); }
ul.tokens { list-style: none; margin: 0; padding: 0; white-space: nowrap; }
.noisy-badge { color: #b00020; font-weight: 600; }
.clean-badge { color: #2e7d32; }
.controls { display: flex; gap: 16px; align-items: center; margin: 8px 0; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 10px; vertical-align: middle; }
tr[hidden] { display: none; }
details { margin: 6px 0; }
pre { background: #f7f7f7; padding: 8px; overflow: auto; font-size: 0.85em; }
"""

JS = r"""
(function () {
  "use strict";
  var table = document.getElementById("flagged-table");
  var methodSel = document.getElementById("filter-method");
  var familySel = document.getElementById("filter-family");
  var counter = document.getElementById("flagged-count");

  function hasOption(select, value) {
    for (var i = 0; i < select.options.length; i++) {
      if (select.options[i].value === value) { return true; }
    }
    return false;
  }

  function applyFilters() {
    if (!table) { return; }
    var method = methodSel.value, family = familySel.value, shown = 0;
    var rows = table.tBodies[0].rows;
    for (var i = 0; i < rows.length; i++) {
      var row = rows[i];
      var ok = (method === "all" || row.getAttribute("data-method") === method) &&
               (family === "all" || row.getAttribute("data-family") === family);
      row.hidden = !ok;
      if (ok) { shown++; }
    }
    counter.textContent = shown + " of " + rows.length + " rows shown";
    document.body.setAttribute("data-filter", "method=" + method + ";family=" + family);
  }

  function readHash() {
    if (!table) { return; }
    var raw = window.location.hash.replace(/^#/, "");
    if (raw.indexOf("=") < 0) { return; }
    var params = new URLSearchParams(raw);
    var method = params.get("method"), family = params.get("family");
    if (method !== null && hasOption(methodSel, method)) { methodSel.value = method; }
    if (family !== null && hasOption(familySel, family)) { familySel.value = family; }
  }

  function writeHash() {
    var params = new URLSearchParams();
    params.set("method", methodSel.value);
    params.set("family", familySel.value);
    history.replaceState(null, "", "#" + params.toString());
  }

  function cellKey(cell) {
    var key = cell.getAttribute("data-sort");
    if (key === null) { key = cell.textContent.trim(); }
    var number = parseFloat(key);
    return (key !== "" && isFinite(key) && !isNaN(number)) ? number : key.toLowerCase();
  }

  function sortBy(tableEl, header) {
    var index = header.cellIndex;
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    var heads = tableEl.tHead.rows[0].cells;
    for (var h = 0; h < heads.length; h++) { heads[h].removeAttribute("aria-sort"); }
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var body = tableEl.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellKey(a.cells[index]), y = cellKey(b.cells[index]);
      var cmp;
      if (typeof x === "number" && typeof y === "number") { cmp = x - y; }
      else { cmp = String(x) < String(y) ? -1 : (String(x) > String(y) ? 1 : 0); }
      return ascending ? cmp : -cmp;
    });
    for (var i = 0; i < rows.length; i++) { body.appendChild(rows[i]); }
  }

  var sortable = document.querySelectorAll("table.sortable");
  for (var t = 0; t < sortable.length; t++) {
    (function (tableEl) {
      var heads = tableEl.tHead.rows[0].cells;
      for (var h = 0; h < heads.length; h++) {
        heads[h].addEventListener("click", function (event) { sortBy(tableEl, event.currentTarget); });
      }
    })(sortable[t]);
  }

  if (table) {
    methodSel.addEventListener("change", function () { applyFilters(); writeHash(); });
    familySel.addEventListener("change", function () { applyFilters(); writeHash(); });
    window.addEventListener("hashchange", function () { readHash(); applyFilters(); });
    readHash();
    applyFilters();
  }
  document.body.setAttribute("data-ready", "1");
})();
"""
