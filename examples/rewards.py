"""A TRL-style reward file for `aift train --method grpo --reward python:examples/rewards.py:FUNCTION`.

A reward function gets the prompts, the completions (strings for text data) and every other column of the data
as keyword arguments (``reference`` here), one value per completion, and returns one float (or None) each.
"""

import re


def close_number(prompts, completions, reference, **kwargs):
    """1.0 for the right number, less the further off it is, 0.0 without a number; None without a reference."""
    scores = []
    for completion, ref in zip(completions, reference):
        if ref is None:
            scores.append(None)
            continue
        found = re.search(r"-?\d+", completion)
        if found is None:
            scores.append(0.0)
            continue
        scores.append(1.0 / (1.0 + abs(int(found.group()) - int(ref))))
    return scores
