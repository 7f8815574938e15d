"""One-line warnings for a search too short to have learned anything, so that its plan is
not taken for a finding: weights trained for less than an epoch, plans that score near
chance, or (DNAS) choice probabilities still near uniform."""

from __future__ import annotations

NEAR_CHANCE = 1.5     # accuracy below this multiple of chance counts as near chance
NEAR_UNIFORM = 1.25   # theta: no layer's top choice above this multiple of 1/choices


def training_warnings(steps: int, steps_per_epoch: int, what: str) -> list[str]:
    if steps < steps_per_epoch:
        return [f"the {what} trained for {steps} steps, less than one epoch "
                f"({steps_per_epoch}): its weights are barely trained; give a larger budget"]
    return []


def accuracy_warnings(accuracy: float, classes: int, what: str) -> list[str]:
    chance = 100.0 / max(1, classes)
    if accuracy == accuracy and accuracy < NEAR_CHANCE * chance:
        return [f"{what} scored {accuracy:.1f}%, near chance ({chance:.1f}% for {classes} "
                f"classes): the ranking of plans means little; give a larger budget"]
    return []


def theta_warnings(supernet) -> list[str]:
    probs = [p.detach() for p in supernet.probs() if len(p) > 1]
    if not probs:
        return []
    top = max(float(p.max()) * len(p) for p in probs)
    if top < NEAR_UNIFORM:
        return [f"theta is still near uniform (no layer's likeliest choice is above "
                f"{NEAR_UNIFORM:g}x its uniform share): the search had too few steps to prefer "
                f"any precision; give a larger budget"]
    return []


def dnas_warnings(steps: int, steps_per_epoch: int, supernet, test_accuracy: float,
                  classes: int) -> list[str]:
    return (training_warnings(steps, steps_per_epoch, "supernet")
            + accuracy_warnings(test_accuracy, classes, "the chosen plan")
            + theta_warnings(supernet))
