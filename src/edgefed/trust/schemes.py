"""The trust schemes: each turns what a device knows into row i of W.

    perplexity   −(mean NLL) of each adapter on this device's trust-validation tokens (llama.cpp)
    prediction   −(mean total-variation distance) between each adapter's top-k next-token
                 distribution and this device's own, on the federation's reference text
    weights      cosine similarity of each adapter's ΔW = B·A with this device's own
    fedavg       uniform weights, or proportional to training tokens
    local        this device alone (W = I)
    oracle       the dot products of the devices' known data mixtures, normalised per row: the
                 mix that knows the truth, a reference only a simulation can compute
    auto         the best of local, FedAvg and perplexity rows at three sharpnesses, each mixed
                 and scored on validation tokens the trust scores never saw (`trust.choose`)
    fedsa        FedSA-LoRA (Guo et al., ICLR 2025): the A factors averaged, B kept local
    graph        pFedGraph (Ye et al., ICML 2023): min Σ_j w_j·(−cos ΔW_ij) + α‖w − p‖² over
                 the simplex, p the devices' shares of training tokens

Scores are "higher is more trusted" and go through `trust_row` (top-k, threshold, softmax with
temperature); fedavg, local and oracle set their weights directly. The runtime schemes also record
each peer's standard error relative to the device's own score (`trust.noise`), and with
`se_temperature` their softmax is in units of it: sharp only where the evidence is. Each name is
bound to its own `TrustScheme` record in `SCHEMES` by `register_scheme` (its function, its measured
default sharpness, what it needs, its help line: the CLI's help is generated from these records) and
the row records the scheme that produced it: the paper's public code matched names by substring and
silently ran one scheme under another's name. A device with no peers gets weight 1 without any
scoring: nothing the runtime could say would change its row (its score is None).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from edgefed.errors import ConfigError, DataError
from edgefed.trust.noise import (
    PERPLEXITY_NOISE_FLOOR,
    PREDICTION_NOISE_FLOOR,
    paired_standard_error,
)
from edgefed.trust.normalize import trust_row
from edgefed.trust.similarity import delta_cosine

DEFAULT_TOP_K_TOKENS = 16
DEFAULT_SCHEME = "perplexity"


@dataclass(frozen=True)
class TrustInputs:
    """What a device has when it computes its row; runtime schemes need the runtime fields."""

    own: str
    adapters: Mapping[str, Mapping]  # device -> LoRA tensors, this device's own included
    train_tokens: Mapping[str, int] = field(default_factory=dict)
    runtime: object | None = None  # a LlamaRuntime with the base loaded
    runtime_adapters: Mapping[str, object] = field(default_factory=dict)  # device -> loaded
    val_tokens: np.ndarray | None = None
    reference_tokens: np.ndarray | None = None
    on_progress: Callable | None = None  # ScoreProgress events while the runtime scores
    mixtures: Mapping[str, Mapping[str, float]] | None = None  # device -> its data's mixture
    # auto trust: the tokens candidates are chosen on (disjoint from val_tokens), and the
    # runtime adapter of the mix a row of weights (in `_devices` order) makes
    selection_tokens: np.ndarray | None = None
    load_mix: Callable[[list[float]], object] | None = None


@dataclass(frozen=True)
class TrustRow:
    """Row i of W with the raw scores it came from, in `devices` order."""

    scheme: str
    devices: list[str]
    scores: list[float | None]  # None: not scored (a device alone)
    weights: list[float]
    # each score's standard error relative to the device's own (None for itself); runtime
    # schemes only
    errors: list[float | None] | None = None
    # auto: every candidate mix with its selection score (`Candidate.as_dict`), the chosen
    # one's label first
    candidates: list[dict] | None = None
    # fedsa: the weights the B factors are mixed by, when they differ from `weights` (A's)
    b_weights: list[float] | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def weight_of(self, device: str) -> float:
        return self.weights[self.devices.index(device)]


@dataclass(frozen=True)
class Normalization:
    temperature: float | None = 1.0  # in the scores' own units; None with se_temperature
    top_k: int | None = None
    threshold: float | None = None
    se_temperature: float | None = None  # set: the temperature is in standard errors instead


def _devices(inputs: TrustInputs) -> list[str]:
    if inputs.own not in inputs.adapters:
        raise DataError(f"this device's own adapter ({inputs.own}) is missing", "train first")
    return [inputs.own, *sorted(d for d in inputs.adapters if d != inputs.own)]


def _softmax_row(
    name: str,
    devices: list[str],
    scores: list[float],
    norm: Normalization,
    errors: list[float | None] | None = None,
) -> TrustRow:
    calibrated = norm.se_temperature is not None
    if calibrated and errors is None:
        raise ConfigError(
            f"{name} trust has no standard errors to scale by", "use a fixed temperature (t=T)"
        )
    weights = trust_row(
        scores,
        0,
        temperature=norm.se_temperature if calibrated else norm.temperature,
        top_k=norm.top_k,
        threshold=norm.threshold,
        errors=errors if calibrated else None,
    )
    return TrustRow(name, devices, scores, weights, errors)


def local_trust(inputs: TrustInputs, norm: Normalization) -> TrustRow:
    devices = _devices(inputs)
    weights = [1.0] + [0.0] * (len(devices) - 1)
    return TrustRow("local", devices, list(weights), weights)


def fedavg_trust(inputs: TrustInputs, norm: Normalization, *, by_tokens: bool = False) -> TrustRow:
    devices = _devices(inputs)
    scores = [float(inputs.train_tokens.get(d, 0)) if by_tokens else 1.0 for d in devices]
    if sum(scores) <= 0:
        raise DataError("no training tokens are known for any device", "drop --by-tokens")
    return TrustRow("fedavg", devices, scores, [s / sum(scores) for s in scores])


def oracle_trust(inputs: TrustInputs, norm: Normalization) -> TrustRow:
    """w_ij ∝ ⟨m_i, m_j⟩ over the devices' known mixtures (each normalised to proportions)."""
    if (row := _alone("oracle", inputs)) is not None:
        return row
    devices = _devices(inputs)
    mixtures = inputs.mixtures or {}
    missing = [d for d in devices if not sum(mixtures.get(d, {}).values())]
    if missing:
        raise DataError(
            f"oracle trust needs every device's known data mixture; {', '.join(missing)} has none",
            "only `edgefed simulate` knows its clients' mixtures: choose another --trust",
        )

    def proportions(device: str) -> dict[str, float]:
        total = sum(mixtures[device].values())
        return {label: n / total for label, n in mixtures[device].items()}

    own = proportions(inputs.own)
    scores = [sum(p * own.get(label, 0.0) for label, p in proportions(d).items()) for d in devices]
    return TrustRow("oracle", devices, scores, [s / sum(scores) for s in scores])


def weight_trust(inputs: TrustInputs, norm: Normalization) -> TrustRow:
    devices = _devices(inputs)
    own = inputs.adapters[inputs.own]
    scores = [delta_cosine(own, inputs.adapters[d]) for d in devices]
    return _softmax_row("weights", devices, scores, norm)


def _require_runtime(inputs: TrustInputs, tokens, what: str, fix: str) -> None:
    if inputs.runtime is None or tokens is None or len(tokens) < 2:
        raise DataError(f"{what} is missing", fix)
    missing = [d for d in inputs.adapters if d not in inputs.runtime_adapters]
    if missing:
        raise DataError(f"no runtime adapter for {', '.join(missing)}", "load every adapter")


def _alone(name: str, inputs: TrustInputs) -> TrustRow | None:
    """The row of a device without peers, which needs no scoring; None when it has peers."""
    devices = _devices(inputs)
    return TrustRow(name, devices, [None], [1.0]) if len(devices) == 1 else None


def _jobs(inputs: TrustInputs, devices: list[str], tokens) -> list:
    from edgefed.runtime.llama import ScoreJob

    return [ScoreJob(tokens, inputs.runtime_adapters[d], label=d) for d in devices]


def _errors(per_position: list[np.ndarray], scores: list[float], floor: float) -> list:
    """Each peer's paired standard error against the first (the device itself): None for
    itself and for a peer whose score is not finite (it gets no weight anyway)."""
    own = per_position[0]
    return [None] + [
        paired_standard_error(own, values, floor) if math.isfinite(score) else None
        for values, score in zip(per_position[1:], scores[1:], strict=True)
    ]


def perplexity_trust(inputs: TrustInputs, norm: Normalization) -> TrustRow:
    if (row := _alone("perplexity", inputs)) is not None:
        return row
    _require_runtime(
        inputs, inputs.val_tokens, "the trust-validation text", "train to make the split"
    )
    devices = _devices(inputs)
    scores, errors = _perplexity_scores(inputs, devices)
    return _softmax_row("perplexity", devices, scores, norm, errors)


def _top_k_distributions(top) -> list[dict[int, float]]:
    probabilities = np.exp(top.logprobs.astype(np.float64))
    probabilities /= probabilities.sum(axis=1, keepdims=True)  # renormalised over the top k
    return [
        dict(zip(ids.tolist(), p.tolist(), strict=True))
        for ids, p in zip(top.token_ids, probabilities, strict=True)
    ]


def total_variations(first: list[dict[int, float]], second: list[dict[int, float]]) -> np.ndarray:
    """Per position, ½ Σ |p − q| over the union of both top-k supports, in [0, 1]."""
    distances = []
    for p, q in zip(first, second, strict=True):
        support = p.keys() | q.keys()
        distances.append(0.5 * sum(abs(p.get(t, 0.0) - q.get(t, 0.0)) for t in support))
    return np.asarray(distances, dtype=np.float64)


def prediction_trust(
    inputs: TrustInputs, norm: Normalization, *, k: int = DEFAULT_TOP_K_TOKENS
) -> TrustRow:
    if (row := _alone("prediction", inputs)) is not None:
        return row
    _require_runtime(
        inputs,
        inputs.reference_tokens,
        "the federation's reference text",
        "create the federation with `edgefed init --reference FILE`",
    )
    devices = _devices(inputs)
    results = inputs.runtime.top_ks(
        _jobs(inputs, devices, inputs.reference_tokens),
        k,
        task="trust row",
        on_progress=inputs.on_progress,
    )
    tops = {d: _top_k_distributions(top) for d, top in zip(devices, results, strict=True)}
    # the device's own distance is 0 at every position: its peers pair with zeros
    distances = [total_variations(tops[inputs.own], tops[d]) for d in devices]
    scores = [-float(d.mean()) for d in distances]
    errors = _errors(distances, scores, PREDICTION_NOISE_FLOOR)
    return _softmax_row("prediction", devices, scores, norm, errors)


def _perplexity_scores(inputs: TrustInputs, devices: list[str]):
    results = inputs.runtime.perplexities(
        _jobs(inputs, devices, inputs.val_tokens), task="trust row", on_progress=inputs.on_progress
    )
    scores = [-r.mean_nll for r in results]
    return scores, _errors([r.token_nlls for r in results], scores, PERPLEXITY_NOISE_FLOOR)


def auto_trust(inputs: TrustInputs, norm: Normalization) -> TrustRow:
    """The candidate mix with the lowest loss on the selection tokens (`trust.choose`)."""
    from edgefed.runtime.llama import ScoreJob
    from edgefed.trust.choose import candidate_rows, choose_mix

    if (row := _alone("auto", inputs)) is not None:
        return row
    _require_runtime(
        inputs, inputs.val_tokens, "the trust half of the validation text", "train first"
    )
    if inputs.selection_tokens is None or len(inputs.selection_tokens) < 2:
        raise DataError(
            "auto trust has no selection tokens (the second half of the trust-validation split)",
            "give the device longer documents, or choose a fixed --trust",
        )
    if inputs.load_mix is None:
        raise DataError("auto trust cannot mix its candidates here", "choose a fixed --trust")
    devices = _devices(inputs)
    scores, errors = _perplexity_scores(inputs, devices)

    def score(candidates):
        jobs = [
            ScoreJob(inputs.selection_tokens, inputs.load_mix(c.weights), label=c.label)
            for c in candidates
        ]
        results = inputs.runtime.perplexities(
            jobs, task="candidate mixes", on_progress=inputs.on_progress
        )
        return [r.token_nlls for r in results]

    chosen, scored = choose_mix(candidate_rows(scores, errors), score)
    ordered = [chosen] + [c for c in scored if c is not chosen]
    return TrustRow("auto", devices, scores, chosen.weights, errors, [c.as_dict() for c in ordered])


def fedsa_trust(inputs: TrustInputs, norm: Normalization, *, by_tokens: bool = False) -> TrustRow:
    """FedSA-LoRA: every device's A averaged (as FedAvg weighs), this device's own B."""
    row = fedavg_trust(inputs, norm, by_tokens=by_tokens)
    own_b = [1.0] + [0.0] * (len(row.devices) - 1)
    return TrustRow("fedsa", row.devices, row.scores, row.weights, b_weights=own_b)


PFEDGRAPH_ALPHA = 0.8  # the pFedGraph code's default weight of the prior term


def project_to_simplex(values: np.ndarray) -> np.ndarray:
    """The Euclidean projection onto {w ≥ 0, Σ w = 1} (sort-based, exact)."""
    ordered = np.sort(values)[::-1]
    cumulative = np.cumsum(ordered) - 1.0
    ranks = np.arange(1, len(values) + 1)
    last = ranks[ordered - cumulative / ranks > 0][-1]
    return np.maximum(values - cumulative[last - 1] / last, 0.0)


def graph_trust(
    inputs: TrustInputs, norm: Normalization, *, alpha: float = PFEDGRAPH_ALPHA
) -> TrustRow:
    """pFedGraph's row: argmin_w Σ_j w_j d_j + α‖w − p‖² on the simplex, d_j = −cos(ΔW_i,
    ΔW_j) and p the devices' shares of training tokens (uniform when unknown). The objective
    is a projection: w = Π(p − d / 2α), solved exactly (the paper's code calls a QP solver).
    It differs from `weights` trust (a softmax of the cosines): anchored at the data shares,
    and peers past a margin of dissimilarity get exactly 0."""
    devices = _devices(inputs)
    own = inputs.adapters[inputs.own]
    cosines = np.array([delta_cosine(own, inputs.adapters[d]) for d in devices])
    tokens = np.array([float(inputs.train_tokens.get(d, 0)) for d in devices])
    prior = tokens / tokens.sum() if tokens.sum() > 0 else np.full(len(devices), 1 / len(devices))
    weights = project_to_simplex(prior + cosines / (2 * alpha))
    return TrustRow("graph", devices, cosines.tolist(), weights.tolist())


class Needs(enum.Flag):
    """What a scheme reads besides the adapters: aggregation loads the runtime and cuts the
    texts only for schemes that declare them, and refuses one whose input a device lacks."""

    NOTHING = 0
    RUNTIME = enum.auto()  # scores with llama.cpp: the base and every adapter get loaded
    VALIDATION_TEXT = enum.auto()  # this device's own trust-validation split
    SELECTION_TEXT = enum.auto()  # that split cut in a trust half and a selection half (auto)
    REFERENCE = enum.auto()  # the federation's shared reference text
    TRAIN_TOKENS = enum.auto()  # each device's training tokens (as its manifest states them)
    MIXTURES = enum.auto()  # the devices' known data mixtures: a simulation's reference only


@dataclass(frozen=True, kw_only=True)
class TrustScheme:
    """Everything edgefed knows about one scheme, in one place.

    The default sharpness is chosen by measurement (docs/measurements/regime-map.md):
    `default_se_temperature`, when set, is the softmax temperature in standard errors of each peer's
    paired score difference and is the scheme's default; otherwise `default_temperature` is, in the
    scores' own units. Perplexity's 3 standard errors: in the regime map of bench/quality.py (scores
    about one standard error apart) it beat FedAvg by more than 2 paired σ after 1 epoch on both
    code/prose federations, where 10 was too soft to follow the evidence, and stayed within noise of
    FedAvg after 3 epochs, where 1 fell 2-4% behind it; a fixed 0.01 nats (bench/temperature.py's
    earlier choice) turns the noise into one-hot rows. Prediction's 0.1 (TV distance, its scores 20
    standard errors apart: noise is not what limits it) and weights' 1.0 (cosine) come from the
    earlier quality benchmark. Both None: the scheme sets its weights directly.
    """

    name: str
    function: Callable[..., TrustRow]
    help: str  # one line for --help and the docs' table
    needs: Needs = Needs.NOTHING
    measures_noise: bool = False  # records standard errors: a temperature in them (se=Z) works
    takes_by_tokens: bool = False  # its function takes `by_tokens` (--by-tokens)
    default_temperature: float | None = None
    default_se_temperature: float | None = None

    @property
    def needs_runtime(self) -> bool:
        return Needs.RUNTIME in self.needs

    @property
    def needs_validation_text(self) -> bool:
        return Needs.VALIDATION_TEXT in self.needs

    @property
    def needs_selection_text(self) -> bool:
        return Needs.SELECTION_TEXT in self.needs

    @property
    def needs_reference(self) -> bool:
        return Needs.REFERENCE in self.needs

    @property
    def needs_mixtures(self) -> bool:
        return Needs.MIXTURES in self.needs

    def describe(self) -> str:
        return f"{self.name} ({self.help})"

    @property
    def default_sharpness(self) -> str | None:
        """'se=2' or 't=0.1': the default as a variant label writes it."""
        if self.default_se_temperature is not None:
            return f"se={self.default_se_temperature:g}"
        return None if self.default_temperature is None else f"t={self.default_temperature:g}"


SCHEMES: dict[str, TrustScheme] = {}


def register_scheme(scheme: TrustScheme) -> TrustScheme:
    """Make `scheme` known by its name to --trust, the help texts and aggregation. A name is
    bound once: registering it again is refused, so no scheme can run under another's name."""
    if scheme.name in SCHEMES:
        raise ConfigError(
            f"trust scheme '{scheme.name}' is registered twice", "give the new scheme its own name"
        )
    SCHEMES[scheme.name] = scheme
    return scheme


register_scheme(
    TrustScheme(
        name="perplexity",
        function=perplexity_trust,
        help="your adapters' loss on your trust-validation text",
        needs=Needs.RUNTIME | Needs.VALIDATION_TEXT,
        measures_noise=True,
        default_se_temperature=3.0,
    )
)
register_scheme(
    TrustScheme(
        name="prediction",
        function=prediction_trust,
        help="agreement on the federation's reference text",
        needs=Needs.RUNTIME | Needs.REFERENCE,
        measures_noise=True,
        default_temperature=0.1,
    )
)
register_scheme(
    TrustScheme(
        name="weights",
        function=weight_trust,
        help="ΔW cosine",
        default_temperature=1.0,
    )
)
register_scheme(
    TrustScheme(
        name="fedavg",
        function=fedavg_trust,
        help="uniform, or by training tokens",
        needs=Needs.TRAIN_TOKENS,
        takes_by_tokens=True,
    )
)
register_scheme(TrustScheme(name="local", function=local_trust, help="yourself alone"))
register_scheme(
    TrustScheme(
        name="oracle",
        function=oracle_trust,
        help="the known data mixtures; simulations only",
        needs=Needs.MIXTURES,
    )
)
register_scheme(
    TrustScheme(
        name="auto",
        function=auto_trust,
        help="the best of local, FedAvg and perplexity rows on held-out tokens",
        needs=Needs.RUNTIME | Needs.VALIDATION_TEXT | Needs.SELECTION_TEXT,
    )
)
register_scheme(
    TrustScheme(
        name="fedsa",
        function=fedsa_trust,
        help="FedSA-LoRA: A averaged, B kept local",
        needs=Needs.TRAIN_TOKENS,
        takes_by_tokens=True,
    )
)
register_scheme(
    TrustScheme(
        name="graph",
        function=graph_trust,
        help="pFedGraph: ΔW cosine against data shares, sparse",
        needs=Needs.TRAIN_TOKENS,
    )
)


def trust_scheme(name: str) -> TrustScheme:
    """The scheme named `name`; ConfigError for any other name (never a fallback)."""
    scheme = SCHEMES.get(name)
    if scheme is None:
        raise ConfigError(f"unknown trust scheme '{name}'", f"choose one of {', '.join(SCHEMES)}")
    return scheme


def schemes_help() -> str:
    """'perplexity (...), prediction (...), ...': a device's --trust help, from the records
    (oracle, which needs the data mixtures only a simulation knows, is left out)."""
    return ", ".join(s.describe() for s in SCHEMES.values() if not s.needs_mixtures)


def temperatures_help() -> str:
    """'perplexity t=0.01, prediction t=0.1, weights t=1': the defaults, from the records."""
    return ", ".join(
        f"{s.name} {s.default_sharpness}" for s in SCHEMES.values() if s.default_sharpness
    )


def compute_trust(
    scheme: str, inputs: TrustInputs, norm: Normalization | None = None, **options
) -> TrustRow:
    """Row i of W by the named scheme; ConfigError for an unknown name (never a fallback)."""
    row = trust_scheme(scheme).function(inputs, norm or Normalization(), **options)
    assert row.scheme == scheme  # each name runs its own code path
    return row
