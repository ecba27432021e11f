"""Writes the small sample data set shipped in the package (src/magpie_teach/resources/sample_responses.jsonl).

Three tiny "teachers" answer the same 24 instructions in three styles: a terse one, a thorough one
with an explanation, and one that answers in a list. The text is written for this project.
Run: python scripts/make_sample.py
"""

import hashlib
import json
from pathlib import Path

FACTS = [
    (
        "What is the boiling point of water at sea level?",
        "Water boils at 100 degrees Celsius at sea level.",
        "At that pressure the vapour pressure of water equals the pressure of the air above it, so bubbles of steam can form inside the liquid.",
        [
            "It is 100 degrees Celsius, or 212 degrees Fahrenheit.",
            "The value drops as you climb, because air pressure falls.",
            "Dissolved salt raises it slightly.",
        ],
    ),
    (
        "Explain what a prime number is.",
        "A prime number is a whole number greater than one whose only divisors are one and itself.",
        "For example 2, 3, 5, 7 and 11 are prime, while 9 is not because three times three is nine. Every whole number above one is a product of primes in exactly one way.",
        [
            "A prime has exactly two divisors.",
            "Two is the only even prime.",
            "There are infinitely many primes, as Euclid proved.",
        ],
    ),
    (
        "How do I reverse a list in Python?",
        "Call the list's reverse method, or take a reversed copy with the slice items[::-1].",
        "The method reverse changes the list in place and returns None, while slicing builds a new list and leaves the original alone. The built-in reversed gives an iterator when you only need to loop backwards.",
        ["In place: items.reverse().", "A copy: items[::-1].", "An iterator: reversed(items)."],
    ),
    (
        "Give me a tip for writing clear emails.",
        "Put your request in the first sentence and keep the rest short.",
        "Busy readers skim, so the subject line and opening sentence should say what you need and by when. Details and background can follow in a few short paragraphs.",
        [
            "State the request first.",
            "Use a specific subject line.",
            "Keep paragraphs short.",
            "End with a clear next step.",
        ],
    ),
    (
        "Why is the sky blue?",
        "Air scatters blue sunlight more strongly than red light, so blue light reaches us from every direction of the sky.",
        "This is Rayleigh scattering: small molecules scatter short wavelengths much more than long ones. At sunset the light crosses more air, the blue is scattered away, and the sky turns red and orange.",
        [
            "Sunlight contains every colour.",
            "Molecules in the air scatter short wavelengths most.",
            "So scattered blue light fills the sky.",
        ],
    ),
    (
        "What does a compiler do?",
        "A compiler translates source code written by people into machine code or another lower level form that a computer can run.",
        "It usually parses the program into a tree, checks types and names, optimises the result and finally emits instructions. Interpreters, by contrast, run the program directly without producing a separate executable.",
        ["Parses the source code.", "Checks it for errors.", "Optimises it.", "Emits machine code."],
    ),
    (
        "Suggest a healthy breakfast.",
        "Oatmeal with fruit and a handful of nuts is a healthy breakfast.",
        "Oats give slow release energy and fibre, fruit adds vitamins, and nuts bring protein and good fats that keep you full until lunch. Add yogurt if you want more protein.",
        ["Oatmeal with berries.", "Greek yogurt with nuts.", "Whole grain toast with eggs."],
    ),
    (
        "Translate 'good morning' into French.",
        "Good morning in French is 'bonjour'.",
        "Bonjour literally means good day and is used from morning until early evening. In the evening people say 'bonsoir' instead.",
        ["Bonjour: good morning or good day.", "Bonsoir: good evening.", "Bonne nuit: good night."],
    ),
    (
        "What is photosynthesis?",
        "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make sugar and release oxygen.",
        "It happens in the chloroplasts of leaf cells, where chlorophyll absorbs light. The energy splits water, oxygen is released, and the captured energy is used to build glucose from carbon dioxide.",
        [
            "Plants absorb light with chlorophyll.",
            "Water is split and oxygen released.",
            "Carbon dioxide becomes sugar.",
        ],
    ),
    (
        "How can I improve my sleep?",
        "Go to bed at the same time every night and keep screens out of the bedroom.",
        "A regular schedule sets your body clock, and bright screens delay the release of melatonin. A cool, dark and quiet room, less caffeine after noon and some daylight in the morning also help.",
        [
            "Keep a regular schedule.",
            "Avoid screens before bed.",
            "Limit caffeine after noon.",
            "Keep the room cool and dark.",
        ],
    ),
    (
        "What is the difference between weather and climate?",
        "Weather is the state of the atmosphere on a given day, while climate is the average pattern of weather over many years.",
        "A cold week in summer is weather; the fact that summers in a region are usually warm and dry is climate. Climate scientists typically look at averages over thirty years or more.",
        [
            "Weather: short term, hours to days.",
            "Climate: long term averages.",
            "Climate is what you expect, weather is what you get.",
        ],
    ),
    (
        "Write a haiku about autumn.",
        "Red leaves drift and fall / the cold wind hums through bare trees / the year breathes out slow",
        "This haiku follows the five, seven, five pattern of syllables and uses falling leaves and wind as the seasonal images that the form traditionally asks for.",
        ["Red leaves drift and fall", "the cold wind hums through bare trees", "the year breathes out slow"],
    ),
    (
        "How does a vaccine work?",
        "A vaccine trains the immune system to recognise a germ without causing the disease, so the body can fight the real infection quickly.",
        "It presents a harmless piece or weakened form of the pathogen. The immune system makes antibodies and memory cells, which respond much faster when the real pathogen appears later.",
        [
            "It shows the immune system a harmless part of a germ.",
            "The body makes antibodies and memory cells.",
            "Later infections are stopped quickly.",
        ],
    ),
    (
        "What is a good way to learn a new language?",
        "Practise a little every day and speak with native speakers as early as you can.",
        "Short daily sessions beat long weekly ones because memory is built by repetition. Speaking early forces you to use what you know, and mistakes are part of learning.",
        [
            "Study every day.",
            "Speak from the start.",
            "Learn the most common words first.",
            "Listen to podcasts and music.",
        ],
    ),
    (
        "Explain recursion to a beginner.",
        "Recursion is when a function solves a problem by calling itself on a smaller version of the same problem.",
        "Every recursive function needs a base case that stops the calls, such as the factorial of one being one. Each call works on a smaller input until the base case is reached.",
        ["A function calls itself.", "Each call gets a smaller problem.", "A base case stops the recursion."],
    ),
    (
        "Name three renewable energy sources.",
        "Solar, wind and hydroelectric power are renewable energy sources.",
        "They are renewable because the sun, the wind and flowing water are replenished naturally and will not run out on human time scales, unlike coal, oil and gas.",
        ["Solar power.", "Wind power.", "Hydroelectric power."],
    ),
    (
        "What causes the seasons?",
        "The seasons are caused by the tilt of the Earth's axis, which changes how directly sunlight hits each hemisphere during the year.",
        "When a hemisphere leans towards the sun, its days are longer and sunlight arrives at a steeper angle, so it is summer there. Distance from the sun plays only a tiny role.",
        [
            "The Earth's axis is tilted.",
            "Sunlight hits each hemisphere at different angles.",
            "Longer days bring summer.",
        ],
    ),
    (
        "How do I make a cup of green tea?",
        "Steep a teaspoon of green tea in water at about 80 degrees Celsius for two to three minutes.",
        "Boiling water makes green tea bitter, so let the kettle cool for a few minutes first. Remove the leaves once the time is up, because steeping longer releases more bitter tannins.",
        [
            "Heat water to about 80 degrees.",
            "Use one teaspoon of leaves.",
            "Steep two to three minutes.",
            "Remove the leaves.",
        ],
    ),
    (
        "What is inflation?",
        "Inflation is the general rise in prices over time, which means each unit of money buys less.",
        "Central banks measure it with price indexes and often aim for about two percent a year. High inflation erodes savings, while falling prices can also hurt an economy.",
        ["Prices rise over time.", "Money loses purchasing power.", "Central banks try to keep it low and stable."],
    ),
    (
        "Give me a short motivational quote.",
        "Small steps every day add up to big results.",
        "The idea is that consistency matters more than intensity: a little progress each day compounds over weeks and months into something you could not have done in one go.",
        ["Small steps every day add up.", "Start before you feel ready.", "Progress beats perfection."],
    ),
    (
        "What is the capital of Australia?",
        "The capital of Australia is Canberra.",
        "Many people guess Sydney or Melbourne, but Canberra was chosen as a compromise between those two rival cities and became the capital in 1913.",
        ["Capital: Canberra.", "Largest city: Sydney.", "Canberra was purpose built as the capital."],
    ),
    (
        "How do I center text in CSS?",
        "Use text-align: center on the element that contains the text.",
        "For centring a block element itself, give it a width and margin: 0 auto, or make the parent a flex container with justify-content: center and align-items: center.",
        [
            "Inline text: text-align: center.",
            "A block: margin: 0 auto.",
            "Both axes: display: flex with justify-content and align-items set to center.",
        ],
    ),
    (
        "What is machine learning?",
        "Machine learning is a way of building programs that learn patterns from data instead of following hand written rules.",
        "A model is trained on examples, adjusting its parameters to reduce its errors, and then makes predictions on new data. Supervised, unsupervised and reinforcement learning are its main kinds.",
        ["Programs learn from data.", "Models are trained to reduce errors.", "Trained models predict on new data."],
    ),
    (
        "Why should I drink enough water?",
        "Water keeps your body temperature steady, carries nutrients and helps your kidneys remove waste.",
        "Even mild dehydration can cause headaches, tiredness and poor concentration. Needs vary with heat and exercise, so drink when you are thirsty and more when you sweat.",
        ["It regulates body temperature.", "It carries nutrients.", "It helps remove waste.", "It keeps you alert."],
    ),
]

TEACHERS = {
    "tiny-teacher-terse": lambda short, long, items: short,
    "tiny-teacher-thorough": lambda short, long, items: f"{short} {long}",
    "tiny-teacher-lists": lambda short, long, items: "Here is a summary:\n" + "\n".join(f"- {item}" for item in items),
}


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "src" / "magpie_teach" / "resources" / "sample_responses.jsonl"
    with out.open("w") as f:
        for teacher, write in TEACHERS.items():
            for instruction, short, long, items in FACTS:
                row = {
                    "id": hashlib.sha1(instruction.encode()).hexdigest()[:12],
                    "instruction": instruction,
                    "teacher": teacher,
                    "response": write(short, long, items),
                }
                f.write(json.dumps(row) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
