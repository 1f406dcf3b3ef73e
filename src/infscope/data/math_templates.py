"""The ten word-problem templates of ``math_no_reason`` / ``math_reason``.

Each template has four integer slots ``a, b, c, d`` that appear in the question in that order
(and no other digits do), a sampler that picks values keeping the answer a non-negative integer,
the answer formula, and a short worked solution ending in "The answer is N.".
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class MathTemplate:
    """A word problem with four integer slots."""

    name: str
    questions: tuple[str, ...]
    sample: Callable[[random.Random], tuple[int, int, int, int]]
    answer: Callable[[int, int, int, int], int]
    reasoning: Callable[[int, int, int, int], str]


def _pizza(rng: random.Random) -> tuple[int, int, int, int]:
    a, b, c = rng.randint(6, 12), rng.randint(2, 5), rng.randint(2, 6)
    return a, b, c, rng.randint(1, min(4, a * b // c))


def _area(rng: random.Random) -> tuple[int, int, int, int]:
    a, b = rng.randint(5, 20), rng.randint(5, 20)
    return a, b, rng.randint(1, a - 1), rng.randint(1, b - 1)


def _discount(rng: random.Random) -> tuple[int, int, int, int]:
    return 20 * rng.randint(1, 6), rng.randint(1, 5), rng.choice((10, 20, 25, 50)), rng.randint(3, 15)


def _interest(rng: random.Random) -> tuple[int, int, int, int]:
    a, b, c = 100 * rng.randint(2, 20), rng.randint(1, 9), rng.randint(1, 5)
    return a, b, c, rng.randint(10, a + a * b * c // 100)


def _share(rng: random.Random) -> tuple[int, int, int, int]:
    a, b, d = rng.randint(2, 9), rng.randint(6, 15), rng.randint(2, 6)
    per_child = rng.randint(1, (a * b - 1) // d)
    return a, b, a * b - d * per_child, d


def _savings(rng: random.Random) -> tuple[int, int, int, int]:
    a, b, c = rng.randint(5, 60), rng.randint(2, 20), rng.randint(2, 12)
    return a, b, c, rng.randint(1, a + b * c)


def _small4(low: int, high: int) -> Callable[[random.Random], tuple[int, int, int, int]]:
    def sample(rng: random.Random) -> tuple[int, int, int, int]:
        return rng.randint(low, high), rng.randint(low, high), rng.randint(low, high), rng.randint(low, high)

    return sample


def _boxes(rng: random.Random) -> tuple[int, int, int, int]:
    a, b, c = rng.randint(5, 30), rng.randint(2, 8), rng.randint(2, 6)
    return a, b, c, rng.randint(0, a * b * c // 4)


TEMPLATES: tuple[MathTemplate, ...] = (
    MathTemplate(
        "slices_left",
        (
            "A pizza is cut into {a} slices and there are {b} pizzas. {c} friends each eat {d} slices. How many slices are left?",
            "Every pizza has {a} slices and {b} pizzas are ordered. After {c} guests eat {d} slices each, how many slices remain?",
        ),
        _pizza,
        lambda a, b, c, d: a * b - c * d,
        lambda a, b, c, d: (
            f"There are {a} x {b} = {a * b} slices. The friends eat {c} x {d} = {c * d}. {a * b} - {c * d} = {a * b - c * d}."
        ),
    ),
    MathTemplate(
        "total_points",
        (
            "A team scores {a} goals worth {b} points each and {c} bonuses worth {d} points each. How many points in total?",
            "In a game, {a} baskets earn {b} points each and {c} free throws earn {d} points each. What is the total score?",
        ),
        _small4(1, 12),
        lambda a, b, c, d: a * b + c * d,
        lambda a, b, c, d: (
            f"{a} x {b} = {a * b} and {c} x {d} = {c * d}. {a * b} + {c * d} = {a * b + c * d}."
        ),
    ),
    MathTemplate(
        "area_left",
        (
            "A garden is {a} m by {b} m. A patio of {c} m by {d} m is paved inside it. How many square metres are left for plants?",
            "A room measures {a} m by {b} m and a rug of {c} m by {d} m covers part of it. How many square metres of floor are uncovered?",
        ),
        _area,
        lambda a, b, c, d: a * b - c * d,
        lambda a, b, c, d: (
            f"The whole area is {a} x {b} = {a * b}. The covered part is {c} x {d} = {c * d}. {a * b} - {c * d} = {a * b - c * d}."
        ),
    ),
    MathTemplate(
        "discount",
        (
            "Shirts cost ${a} each. You buy {b} shirts and get {c}% off the total, then pay ${d} for shipping. How many dollars do you pay?",
            "A book costs ${a}. Buying {b} books gives a {c}% discount on the total, and delivery adds ${d}. What is the final cost in dollars?",
        ),
        _discount,
        lambda a, b, c, d: a * b * (100 - c) // 100 + d,
        lambda a, b, c, d: (
            f"The total is {a} x {b} = {a * b}. After {c}% off it is {a * b} x {100 - c} / 100 = "
            f"{a * b * (100 - c) // 100}. Adding {d} gives {a * b * (100 - c) // 100 + d}."
        ),
    ),
    MathTemplate(
        "interest",
        (
            "You deposit ${a} at {b}% simple interest per year for {c} years, then withdraw ${d}. How many dollars are left?",
            "A saver puts ${a} in a bank paying {b}% simple interest a year. After {c} years they take out ${d}. How much remains in dollars?",
        ),
        _interest,
        lambda a, b, c, d: a + a * b * c // 100 - d,
        lambda a, b, c, d: (
            f"Interest is {a} x {b} x {c} / 100 = {a * b * c // 100}. The balance is {a} + {a * b * c // 100} = "
            f"{a + a * b * c // 100}. {a + a * b * c // 100} - {d} = {a + a * b * c // 100 - d}."
        ),
    ),
    MathTemplate(
        "distance",
        (
            "A train travels at {a} km/h for {b} hours, then at {c} km/h for {d} hours. How many km does it travel?",
            "A cyclist rides at {a} km/h for {b} hours and then at {c} km/h for {d} hours. What distance does she cover in km?",
        ),
        _small4(2, 15),
        lambda a, b, c, d: a * b + c * d,
        lambda a, b, c, d: (
            f"First {a} x {b} = {a * b} km, then {c} x {d} = {c * d} km. {a * b} + {c * d} = {a * b + c * d}."
        ),
    ),
    MathTemplate(
        "sharing",
        (
            "{a} boxes hold {b} apples each. {c} apples are rotten. The rest are shared equally among {d} children. How many apples does each child get?",
            "There are {a} bags with {b} sweets in each. {c} sweets are thrown away and the rest are split evenly between {d} kids. How many sweets per kid?",
        ),
        _share,
        lambda a, b, c, d: (a * b - c) // d,
        lambda a, b, c, d: (
            f"There are {a} x {b} = {a * b}. Without the {c} bad ones, {a * b} - {c} = {a * b - c}. {a * b - c} / {d} = {(a * b - c) // d}."
        ),
    ),
    MathTemplate(
        "savings",
        (
            "Sam has ${a} and saves ${b} per week. After {c} weeks Sam spends ${d}. How many dollars does Sam have?",
            "A jar holds ${a}. Each week ${b} is added, for {c} weeks, and then ${d} is taken out. How many dollars are in the jar?",
        ),
        _savings,
        lambda a, b, c, d: a + b * c - d,
        lambda a, b, c, d: (
            f"Savings are {b} x {c} = {b * c}, so {a} + {b * c} = {a + b * c}. {a + b * c} - {d} = {a + b * c - d}."
        ),
    ),
    MathTemplate(
        "boxes_packed",
        (
            "A worker packs {a} boxes per hour for {b} hours on each of {c} days. {d} boxes are damaged. How many good boxes are packed?",
            "A machine fills {a} crates an hour, runs {b} hours a day for {c} days, and {d} crates fail inspection. How many crates pass?",
        ),
        _boxes,
        lambda a, b, c, d: a * b * c - d,
        lambda a, b, c, d: (
            f"Packed: {a} x {b} x {c} = {a * b * c}. Minus {d} damaged: {a * b * c} - {d} = {a * b * c - d}."
        ),
    ),
    MathTemplate(
        "tickets",
        (
            "Adult tickets cost ${a} and child tickets cost ${b}. A family buys {c} adult and {d} child tickets. How many dollars do they pay?",
            "A museum charges ${a} per adult and ${b} per child. A group of {c} adults and {d} children visits. What is the total in dollars?",
        ),
        _small4(1, 20),
        lambda a, b, c, d: a * c + b * d,
        lambda a, b, c, d: (
            f"Adults: {a} x {c} = {a * c}. Children: {b} x {d} = {b * d}. {a * c} + {b * d} = {a * c + b * d}."
        ),
    ),
)
