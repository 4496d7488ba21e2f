"""What a loaded model can do, as small typed protocols; Serve builds its routes from them.

A loader (:class:`densiray.families.Family.loader`) returns any object; the protocols it satisfies
(checked structurally, no inheritance needed) say which endpoints it has:

=====================  ========================================  ==========================
capability             methods                                   endpoints
=====================  ========================================  ==========================
``Sampler``            ``sample(n, seed)``                        ``/sample``
``Density``            ``log_prob(x)``, ``sample``, ``score``     ``/log_prob``, ``/score``
``Classifier``         ``predict(texts)``                         ``/classify``
``ConditionalSampler`` ``condition(**observations)``              ``/condition``
``Nested``             ``submodels()``, ``for_budget(**budget)``  a ``budget`` on the above
=====================  ========================================  ==========================
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

# The percentiles of in-distribution log p at which a Density calibrates its outlier threshold
# (``threshold(percentile)``, ``score(x, percentile)``); Serve's schema offers exactly these.
OUTLIER_PERCENTILES: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)


@runtime_checkable
class Sampler(Protocol):
    """Draws samples: ``sample(n, seed)`` -> array (n, ...) in the data's units."""

    def sample(self, n: int, seed: int = 0) -> Any: ...


@runtime_checkable
class Density(Sampler, Protocol):
    """A normalised density over R^dim: log-density, exact samples and outlier scores."""

    dim: int
    metrics: dict

    def log_prob(self, x: Any) -> Any: ...

    def score(self, x: Any, percentile: float = 1.0) -> dict: ...

    def threshold(self, percentile: float = 1.0) -> float: ...


@runtime_checkable
class Classifier(Protocol):
    """Labels and class probabilities of texts (or rows): ``predict(items)`` -> {"labels", "probs", ...}.

    An optional attribute ``input_kind`` says what the items are: ``"text"`` (the default when
    absent: a list of strings) or ``"rows"`` (a list of rows of numbers, or the float array Serve
    passes; a rows classifier's ``dim`` gives the features per row, which Serve checks). Further per-item fields
    of the answer are passed through by Serve; a Nested classifier also takes
    ``predict(items, budget={...})`` and answers ``"submodel"``, the sub-model that answered.
    """

    labels: list

    def predict(self, texts: list) -> dict: ...


@runtime_checkable
class ConditionalSampler(Sampler, Protocol):
    """Posterior samples given observations: ``condition(**obs)`` -> {"mean", "std", ...}."""

    def condition(self, **observations: Any) -> dict: ...


@runtime_checkable
class Nested(Protocol):
    """Many sub-models in one: ``submodels()`` lists them with their metrics, ``for_budget(flops=..|
    latency_ms=..|params=..)`` picks the largest that fits (without search), ``submodel(spec)`` one."""

    def submodels(self) -> list[dict]: ...

    def submodel(self, spec: Any) -> Any: ...

    def for_budget(self, **budget: float) -> Any: ...


CAPABILITIES: dict[str, type] = {"density": Density, "sampler": Sampler, "classifier": Classifier,
                                 "conditional_sampler": ConditionalSampler, "nested": Nested}


def capabilities(model: Any) -> list[str]:
    """The names of the capabilities ``model`` has (``density`` implies ``sampler``)."""
    return [name for name, proto in CAPABILITIES.items() if isinstance(model, proto)]
