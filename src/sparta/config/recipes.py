"""Named presets of :class:`~sparta.config.RunConfig` values (``recipe: paper`` in a config
file, ``sparta run --recipe paper``, ``RunConfig.from_recipe("paper")``), each value with the
reason it has that value."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnknownNameError


@dataclass(frozen=True)
class Recipe:
    """A named preset of :class:`RunConfig` values, each with the reason it has that value."""

    name: str
    summary: str
    choices: dict  # field -> (value, reason)

    @property
    def values(self) -> dict:
        return {k: v for k, (v, _) in self.choices.items()}

    def describe(self) -> str:
        lines = [f"{self.name}: {self.summary}"]
        lines += [f"  {k} = {v!r}: {why}" for k, (v, why) in self.choices.items()]
        return "\n".join(lines)


#: The paper's research protocol (Hedegaard et al., Sec. 4 and appendix). It is the same for
#: every method: fine-pruning and the adapters get the same epochs, pruning steps, data split and
#: schedule; only ``adapter_lr_scale`` differs in effect, as it touches adapter parameters alone.
PAPER = Recipe(
    "paper",
    "Hedegaard et al.'s protocol: SGD with momentum and weight decay, step learning rate, "
    "adapters at a higher rate, iterative global pruning of 5% of the filters per step, "
    "hyper-parameters chosen on a validation split of the training data",
    {
        "optimizer": ("sgd", "the paper trains every method with SGD"),
        "momentum": (0.9, "the paper's SGD momentum"),
        "weight_decay": (5e-4, "the paper's weight decay"),
        "lr": (
            0.003,
            "chosen on a validation split (ImageNet MobileNetV2 -> 900 Fashion-MNIST images at "
            "32 px, 3 epochs, seed 0): fine-tuning val 0.73 at 0.003 vs 0.70 at 0.01, and at "
            "0.01 the adapters' 10x (0.1) was unstable (val 0.33)",
        ),
        "lr_schedule": ("step", "the paper's step decay: lr / 10 at 50% and 75% of each phase"),
        "adapter_lr_scale": (
            10.0,
            "the paper trains SPLoRA at a much higher rate than fine-tuning (its ViT runs: "
            "0.1875 vs 0.00625, 30x); on the same validation split, pruned to 30% of the "
            "filters with 1 recovery epoch per step, SPLoRA kept val 0.67 at 10x vs 0.35 at 1x",
        ),
        "init_scale": (1e-4, "adapters start as a tiny perturbation, uniform(+-1e-4)"),
        "ranking": ("global", "filters are ranked globally after per-layer normalisation"),
        "schedule": ("linear", "equal amounts per step"),
        "step_fraction": (
            0.05,
            "each step removes 5% of the original filter count: steps = round((1 - density) / "
            "0.05), e.g. 14 steps to 30% and 18 to 10% filter density",
        ),
        "epochs": (10, "initial training before pruning (the same for every method)"),
        "recovery_epochs": (
            1,
            "training after every pruning step; the paper used 20-50 on CIFAR/Flowers, which "
            "is far beyond a CPU budget; raise it when time allows",
        ),
        "val_fraction": (
            0.1,
            "10% of the training data is held out as a validation split: choose "
            "hyper-parameters on val_accuracy, never on the test accuracy",
        ),
    },
)

#: Every named recipe.
RECIPES: dict[str, Recipe] = {PAPER.name: PAPER}


def recipes() -> dict[str, Recipe]:
    """Every named recipe (``RunConfig.from_recipe(name)``, ``recipe: name`` in a config file,
    ``sparta run --recipe name``)."""
    return dict(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name lists the known ones."""
    if name not in RECIPES:
        raise UnknownNameError("recipe", name, RECIPES)
    return RECIPES[name]
