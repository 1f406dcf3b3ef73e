"""Fixed text banks the semantic and quality operators draw from.

Written for this project. None of the sentences holds a digit, so inserting them never adds a
number, and they are deliberately unrelated to any particular task.
"""

from __future__ import annotations

IRRELEVANT_SENTENCES = (
    "The Great Wall is visible from many mountain passes in northern China.",
    "Octopuses have three hearts and blue blood.",
    "My neighbour repainted her fence a bright shade of orange last week.",
    "Bananas are botanically classified as berries.",
    "The train to the coast was delayed because of fallen leaves.",
    "Honey never spoils if it is stored in a sealed jar.",
    "Some people prefer to read novels in the early morning.",
    "The museum gift shop sells postcards of famous paintings.",
    "Penguins mostly live in the southern hemisphere.",
    "A good cup of tea needs water that has just boiled.",
    "The local bakery closes early on Sundays.",
    "Jupiter has a storm that has lasted for centuries.",
    "Violins are usually made from spruce and maple.",
    "The festival parade was cancelled because of heavy rain.",
    "Cats spend a large part of the day asleep.",
)

OFF_TOPIC_SENTENCES = (
    "Anyway, the weather at the beach was lovely this weekend.",
    "Speaking of which, my favourite football team lost again yesterday.",
    "On another note, I have been learning to bake sourdough bread.",
    "By the way, the new phone models all look the same to me.",
    "That reminds me that I still need to water the plants.",
    "Incidentally, the best pizza in town is sold near the station.",
    "Meanwhile, the cinema down the road is showing an old western.",
    "Also, my cousin just adopted a very energetic puppy.",
    "Honestly, I think winter is the most underrated season.",
    "Unrelated, but the library is hosting a chess tournament soon.",
)

WRONG_CONTEXTS = (
    "The recipe calls for flour, butter, sugar and a pinch of salt.",
    "Tickets for the concert go on sale next month at the box office.",
    "The hiking trail climbs steeply through a pine forest to a lake.",
    "Our quarterly newsletter covers gardening tips and local events.",
    "The hotel offers free breakfast and a shuttle to the airport.",
    "The instructions describe how to assemble a wooden bookshelf.",
)

MEANINGLESS_ANSWERS = (
    "I don't know.",
    "It depends.",
    "That is a good question.",
    "I am not sure about that.",
    "Maybe.",
    "Hard to say.",
    "There are many possible answers.",
    "Please ask someone else.",
    "Yes and no.",
    "N/A",
)

FILLER_PHRASES = (
    "basically,",
    "you know,",
    "as a matter of fact,",
    "in a sense,",
    "to be honest,",
    "well, sort of,",
    "more or less,",
    "if you think about it,",
)

FILLER_SENTENCES = (
    "It is important to note that there are many things to consider here.",
    "As I said before, this is something that is worth thinking about carefully.",
    "In other words, what I mean to say is basically what was said above.",
    "All things considered, this is more or less how it generally tends to be.",
    "To put it another way, it really is what it is when you think about it.",
    "At the end of the day, everything mentioned so far matters in some way or another.",
)
