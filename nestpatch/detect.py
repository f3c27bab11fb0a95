"""Find safety-relevant MLP neurons by activation probing on harmful vs benign prompts.

The NeuroStrike recipe that NeST reuses: hook every MLP ``gate_proj`` / ``up_proj`` output (a
neuron is one intermediate channel: row i of those weights, column i of ``down_proj``), max-pool
each neuron's activation over the prompt tokens, fit one logistic probe per module (harmful = 1),
and keep the neurons whose probe weight has z-score > 3 and is positive. A mean-difference scorer
(standardized mean activation gap, harmful minus benign) is the cheap alternative, and
``gatebreaker`` is the authors' latest one (their GateBreaker code, Dec 2025): the *raw* mean
difference of the max-pooled activations, mean(harmful) - mean(benign), kept where its z-score
within the module is above the threshold (they use 2) and the difference is positive. Raw means
favour neurons with large activations; the standardized gap favours well-separated ones.

Choices that are ours (and parameters): probes of all modules are fitted together as one batched
problem (one Adam step updates every module's independent probe), and an early stop ends the fit
once the loss stops improving. Pooling covers the prompt and the assistant header that follows it,
not the system prompt a chat template may insert (identical for every prompt, it would only add a
floor under every max).

Why ``mean_diff`` is the training default (measured on SmolLM2, 96+96 prompts, docs/RESULTS.md):
with far fewer prompts than neurons per module the classes are linearly separable, and Adam from
zero moves every useful weight at about the same rate, so the probe's z-scores stay flat
(standardized features: no neuron above 3 after 1000 epochs) or depend on when the fit stops (raw
features: 12-26 neurons per module at 100-3000 epochs, little overlap between stopping points);
5000 epochs over 60 modules also take most of a 10-minute CPU budget. The standardized mean gap
costs milliseconds, does not depend on an optimizer trajectory, and finds planted neurons exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError, UnsupportedError
from .models.naming import MODULE_AXIS, MLPRef

log = logging.getLogger(__name__)

DETECTORS = ("probe", "mean_diff", "gatebreaker")
POOLS = ("max", "mean", "last")


# ---------------------------------------------------------------------------------------------
# prompts -> token batches
# ---------------------------------------------------------------------------------------------
def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The text the model sees for a user ``prompt``: its own chat template, generation header included."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_length: int) -> list[tuple[list[int], int]]:
    """Token ids of each formatted prompt and the index of the first token of the prompt span.

    The span starts at the user's text (found in the rendered template) and runs to the end, so
    the assistant header is in it and a system prompt is not. Long prompts keep their end.
    """
    out = []
    templ = has_chat_template(tokenizer)
    for p in prompts:
        text = format_prompt(tokenizer, p)
        start_char = max(0, text.rfind(p)) if templ else 0
        enc = tokenizer(text, add_special_tokens=not templ, return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        first = next((i for i, (s, e) in enumerate(offs) if e > start_char), 0)
        if len(ids) > max_length:  # keep the tail: the assistant header is where the decision is made
            cut = len(ids) - max_length
            ids, first = ids[cut:], max(0, first - cut)
        out.append((ids, first))
    return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and attention mask, both ``(B, T)`` int64."""
    t = max(len(s) for s in seqs)
    ids = np.full((len(seqs), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), t), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = s
        mask[i, t - len(s):] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------
def mlp_refs(model: Any, modules: Sequence[str], layers: Sequence[int] | None = None) -> list[MLPRef]:
    """The MLP projections to hook, checked against the model."""
    n_layers = int(model.config.get_text_config().num_hidden_layers if hasattr(model.config, "get_text_config")
                   else model.config.num_hidden_layers)
    for m in modules:
        if m not in MODULE_AXIS:
            raise InputError(f"unknown MLP module {m!r}; expected some of {', '.join(MODULE_AXIS)}")
    use = list(range(n_layers)) if not layers else list(layers)
    bad = [layer for layer in use if not 0 <= layer < n_layers]
    if bad:
        raise InputError(f"layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    refs = [MLPRef(layer, m) for layer in use for m in modules]
    for r in refs:
        module_of(model, r)
    return refs


def module_of(model: Any, ref: MLPRef) -> Any:
    """The ``nn.Linear`` behind ``ref`` (raises if the model has no such module)."""
    name = ref.hf_name[: -len(".weight")]
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UnsupportedError(f"model has no module {name}: only llama-style MLPs (gate_proj, up_proj, down_proj) are supported") from None


def _backbone(model: Any) -> Any:
    """The decoder without the LM head (the head is not needed for activations)."""
    return getattr(model, "model", model)


def pooled_activations(model: Any, tokenizer: Any, prompts: Sequence[str], refs: Sequence[MLPRef], *,
                       batch_size: int = 16, max_length: int = 256, pool: str = "max",
                       progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Pooled activation of every neuron of ``refs`` on every prompt.

    gate/up: the projection's output (pre-activation for gate); down: its input (the neuron's
    value ``act(gate) * up``), so index i is the same intermediate channel in all three.

    Returns:
        ``{hf_weight_name: float32 (N_prompts, n_ff)}``.
    """
    import torch

    if pool not in POOLS:
        raise InputError(f"unknown pooling {pool!r}; expected one of {POOLS}")
    enc = encode_prompts(tokenizer, prompts, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.get_input_embeddings().weight.device
    out: dict[str, list[np.ndarray]] = {r.hf_name: [] for r in refs}
    span_mask: list[Any] = [None]

    def pooled(a: "torch.Tensor") -> "torch.Tensor":  # a: (B, T, n_ff) -> (B, n_ff)
        m = span_mask[0].to(a.device)  # (B, T) bool
        a = a.float()
        if pool == "max":
            return a.masked_fill(~m[..., None], float("-inf")).amax(dim=1)
        if pool == "mean":
            return (a * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        return a[:, -1, :]  # last token (left padding: the last position is real)

    handles = []
    for r in refs:
        mod = module_of(model, r)
        if r.module == "down_proj":
            handles.append(mod.register_forward_pre_hook(
                lambda _m, args, name=r.hf_name: out[name].append(pooled(args[0]).cpu().numpy())))
        else:
            handles.append(mod.register_forward_hook(
                lambda _m, _a, y, name=r.hf_name: out[name].append(pooled(y).cpu().numpy())))
    try:
        with torch.no_grad():
            for b in range(0, len(enc), batch_size):
                chunk = enc[b:b + batch_size]
                ids, mask = left_pad([c[0] for c in chunk], pad)
                t = ids.shape[1]
                span = np.zeros_like(mask, dtype=bool)
                for i, (seq, first) in enumerate(chunk):
                    span[i, t - len(seq) + first:] = True
                span_mask[0] = torch.from_numpy(span)
                ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
                pos = (mask_t.cumsum(-1) - 1).clamp(min=0)
                _backbone(model)(input_ids=ids_t, attention_mask=mask_t, position_ids=pos, use_cache=False)
                if progress:
                    progress(len(chunk))
    finally:
        for h in handles:
            h.remove()
    return {k: np.concatenate(v, axis=0).astype(np.float32) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
@dataclass
class ProbeFit:
    """Probe weights per module and their accuracies."""

    weights: dict[str, np.ndarray]  # name -> (n_ff,) float32, on standardized features
    train_accuracy: dict[str, float]
    heldout_accuracy: dict[str, float]
    epochs: int


def _standardize(x: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """Per-column z-score of ``x`` with the statistics of ``ref`` (default ``x``)."""
    ref = x if ref is None else ref
    mu, sd = ref.mean(0, keepdims=True), ref.std(0, keepdims=True)
    return (x - mu) / np.maximum(sd, 1e-6)


def split_indices(labels: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified train / held-out split of sample indices."""
    rng = np.random.default_rng(seed)
    tr, ho = [], []
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * holdout)) if holdout > 0 else 0
        k = min(k, len(idx) - 1)
        ho.append(idx[:k])
        tr.append(idx[k:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(ho))


def fit_probes(features: dict[str, np.ndarray], labels: np.ndarray, *, epochs: int = 5000, lr: float = 1e-3,
               weight_decay: float = 1e-3, holdout: float = 0.2, seed: int = 0, tol: float = 1e-5,
               standardize: bool = False, progress: Callable[[int], None] | None = None) -> ProbeFit:
    """Fit one logistic probe per module (Adam, full batch), all modules at once.

    Modules with the same width are stacked into one ``(M, N, F)`` problem; the summed loss has
    independent gradients per module, so this is exactly M separate fits, run as a few ``bmm``.
    The fit stops early once no module's loss improves by more than ``tol`` (relative) over 100 epochs.

    Args:
        standardize: z-score each neuron's pooled activations first (NeuroStrike uses raw activations).
    """
    import torch

    y = np.asarray(labels, dtype=np.float32)
    tr, ho = split_indices(y.astype(int), holdout, seed)
    groups: dict[int, list[str]] = {}
    for name, x in features.items():
        groups.setdefault(x.shape[1], []).append(name)
    weights, acc_tr, acc_ho = {}, {}, {}
    ran = 0
    for width, names in groups.items():
        x_all = np.stack([_standardize(features[n], features[n][tr]) if standardize else features[n] for n in names])  # (M, N, F)
        xt, yt = torch.from_numpy(x_all[:, tr]), torch.from_numpy(y[tr])  # (M, Ntr, F), (Ntr,)
        w = torch.zeros(len(names), width, requires_grad=True)  # (M, F)
        b = torch.zeros(len(names), 1, requires_grad=True)  # (M, 1)
        opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
        target = yt.expand(len(names), -1)  # (M, Ntr)
        last = None
        for ep in range(epochs):
            opt.zero_grad()
            logits = torch.bmm(xt, w[..., None])[..., 0] + b  # (M, Ntr)
            per_module = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
            per_module.sum().backward()
            opt.step()
            if ep % 100 == 99:
                cur = per_module.detach()
                if progress:
                    progress(100)
                if last is not None and bool(((last - cur) / last.clamp(min=1e-12) < tol).all()):
                    ran = max(ran, ep + 1)
                    break
                last = cur
        else:
            ran = epochs
        with torch.no_grad():
            full = torch.from_numpy(x_all)  # (M, N, F)
            pred = (torch.bmm(full, w[..., None])[..., 0] + b > 0).numpy()  # (M, N)
        for i, n in enumerate(names):
            weights[n] = w[i].detach().numpy().astype(np.float32)
            acc_tr[n] = float((pred[i, tr] == (y[tr] > 0.5)).mean())
            acc_ho[n] = float((pred[i, ho] == (y[ho] > 0.5)).mean()) if len(ho) else float("nan")
    return ProbeFit(weights, acc_tr, acc_ho, ran)


def mean_diff_scores(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Standardized mean gap per neuron, harmful minus benign: ``(mu_h - mu_b) / sd_pooled``; ``(F,)``."""
    h, bn = x[labels == 1], x[labels == 0]
    # floor: a neuron constant within both classes would otherwise get an unbounded score
    sd = np.sqrt(0.5 * (h.var(0) + bn.var(0)) + 1e-4 * x.var(0) + 1e-12)
    return ((h.mean(0) - bn.mean(0)) / sd).astype(np.float32)


def raw_mean_diff_scores(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """GateBreaker's score: raw mean pooled activation on harmful minus benign prompts, no scaling; ``(F,)``."""
    return (x[labels == 1].mean(0) - x[labels == 0].mean(0)).astype(np.float32)


def select(scores: np.ndarray, threshold: float = 3.0, min_score: float = 0.0, max_neurons: int = 0) -> np.ndarray:
    """Indices with ``zscore(score) > threshold`` and ``score > min_score`` (sorted); optionally the top ``max_neurons``."""
    s = np.asarray(scores, dtype=np.float64)
    sd = s.std()
    z = (s - s.mean()) / sd if sd > 0 else np.zeros_like(s)
    keep = np.flatnonzero((z > threshold) & (s > min_score))
    if max_neurons and len(keep) > max_neurons:
        keep = keep[np.argsort(-s[keep], kind="stable")[:max_neurons]]
    return np.sort(keep).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# the whole step
# ---------------------------------------------------------------------------------------------
@dataclass
class ModuleSelection:
    """Neurons kept in one MLP projection."""

    ref: MLPRef
    n_neurons: int
    indices: np.ndarray  # (n,) int64, sorted
    scores: np.ndarray  # (n,) float32: probe weight or mean gap of each kept neuron
    profiles: np.ndarray  # (N_prompts, n) float32: pooled activations of the kept neurons
    train_accuracy: float = float("nan")
    heldout_accuracy: float = float("nan")

    @property
    def name(self) -> str:
        return self.ref.hf_name


@dataclass
class Detection:
    """The result of detection over all hooked modules."""

    detector: str
    threshold: float
    modules: list[ModuleSelection]
    n_harmful: int
    n_benign: int
    epochs: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def total_selected(self) -> int:
        return sum(len(m.indices) for m in self.modules)

    def stats(self) -> dict:
        """JSON-ready per-module counts and probe accuracies (for provenance and the CLI)."""
        per = {}
        for m in self.modules:
            e = {"kept": int(len(m.indices)), "of": int(m.n_neurons)}
            if not np.isnan(m.heldout_accuracy):
                e["heldout_accuracy"] = round(float(m.heldout_accuracy), 4)
                e["train_accuracy"] = round(float(m.train_accuracy), 4)
            per[m.name] = e
        total = sum(m.n_neurons for m in self.modules)
        return {
            "detector": self.detector, "threshold": self.threshold, "prompts": {"harmful": self.n_harmful, "benign": self.n_benign},
            "selected": self.total_selected, "of": total, "fraction": round(self.total_selected / max(1, total), 6),
            "probe_epochs": self.epochs, "per_module": per, **self.extra,
        }

    def per_layer(self) -> dict[int, dict[str, int]]:
        """``{layer: {module: kept}}``, for the printed table."""
        out: dict[int, dict[str, int]] = {}
        for m in self.modules:
            out.setdefault(m.ref.layer, {})[m.ref.module] = int(len(m.indices))
        return out


def detect(model: Any, tokenizer: Any, harmful: Sequence[str], benign: Sequence[str], *,
           modules: Sequence[str] = ("gate_proj", "up_proj"), layers: Sequence[int] | None = None,
           detector: str = "mean_diff", threshold: float = 3.0, min_weight: float = 0.0, max_neurons_per_module: int = 0,
           pool: str = "max", batch_size: int = 16, max_length: int = 256, probe_epochs: int = 5000,
           probe_lr: float = 1e-3, probe_weight_decay: float = 1e-3, probe_holdout: float = 0.2,
           probe_standardize: bool = False, seed: int = 0,
           progress: Callable[[str, int, int], Any] | None = None,
           cache: dict | None = None) -> Detection:
    """Pool activations on harmful and benign prompts, score every neuron, keep the outliers.

    Args:
        progress: optional factory ``(description, total, unit_scale) -> callable(n)`` for progress bars.
        cache: optional dict reused across calls on the same model (``nestpatch tune``): pooled
            activations are kept under a key of everything they depend on (prompts, modules,
            layers, pooling, length), so a trial that only changes the scorer or threshold skips the forward passes.

    Raises:
        InputError: empty prompt sets, an unknown detector, or no neuron selected anywhere.
    """
    if detector not in DETECTORS:
        raise InputError(f"unknown detector {detector!r}; expected one of {DETECTORS}")
    refs, labels, acts = _labelled_activations(model, tokenizer, harmful, benign, modules=modules, layers=layers, pool=pool,
                                               max_length=max_length, batch_size=batch_size, progress=progress, cache=cache)
    epochs = 0
    if detector == "probe":
        pbar = progress("probes", probe_epochs, 1) if progress else None
        fit = fit_probes(acts, labels, epochs=probe_epochs, lr=probe_lr, weight_decay=probe_weight_decay,
                         holdout=probe_holdout, seed=seed, standardize=probe_standardize, progress=pbar)
        scores = fit.weights
        epochs = fit.epochs
    else:
        scores = gap_scores(acts, labels, detector)
    sel = []
    for r in refs:
        x = acts[r.hf_name]
        idx = select(scores[r.hf_name], threshold, min_weight, max_neurons_per_module)
        ms = ModuleSelection(r, int(x.shape[1]), idx, scores[r.hf_name][idx], x[:, idx].copy())
        if detector == "probe":
            ms.train_accuracy, ms.heldout_accuracy = fit.train_accuracy[r.hf_name], fit.heldout_accuracy[r.hf_name]
        sel.append(ms)
    det = Detection(detector, float(threshold), sel, len(harmful), len(benign), epochs)
    _check_selected(det, threshold, min_weight, len(refs))
    log.info("detection kept %d of %d neurons", det.total_selected, sum(m.n_neurons for m in sel))
    return det


def _labelled_activations(model: Any, tokenizer: Any, harmful: Sequence[str], benign: Sequence[str], *, modules: Sequence[str],
                          layers: Sequence[int] | None, pool: str, max_length: int, batch_size: int,
                          progress: Callable[[str, int, int], Any] | None,
                          cache: dict | None) -> tuple[list[MLPRef], np.ndarray, dict[str, np.ndarray]]:
    """``(hooked modules, labels (1 = harmful), pooled activations)`` of harmful then benign prompts.

    The activations come from ``cache`` when it holds them (keyed by all they depend on).
    """
    if not harmful or not benign:
        raise InputError(f"detection needs harmful and benign prompts; got {len(harmful)} harmful and {len(benign)} benign")
    refs = mlp_refs(model, modules, layers)
    labels = np.array([1] * len(harmful) + [0] * len(benign), dtype=np.int64)
    prompts = list(harmful) + list(benign)
    key = (tuple(prompts), tuple(r.hf_name for r in refs), pool, max_length)
    acts = cache.get(key) if cache is not None else None
    if acts is None:
        bar = progress("activations", len(prompts), 1) if progress else None
        acts = pooled_activations(model, tokenizer, prompts, refs, batch_size=batch_size, max_length=max_length, pool=pool,
                                  progress=bar)
        if cache is not None:
            cache[key] = acts
    return refs, labels, acts


def gap_scores(acts: dict[str, np.ndarray], labels: np.ndarray, detector: str) -> dict[str, np.ndarray]:
    """Per-module neuron scores of the closed-form detectors (``mean_diff``, ``gatebreaker``)."""
    if detector == "gatebreaker":
        return {n: raw_mean_diff_scores(x, labels) for n, x in acts.items()}
    return {n: mean_diff_scores(_standardize(x), labels) for n, x in acts.items()}


def _check_selected(det: Detection, threshold: float, min_weight: float, n_modules: int) -> None:
    if det.total_selected == 0:
        raise InputError(f"no neuron passed the selection (z-score > {threshold} and score > {min_weight}) in any of "
                         f"{n_modules} modules; try a lower --threshold (e.g. {max(0.5, threshold - 1):g}) or more prompts")


def _subsample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if not k or k >= n else np.sort(rng.choice(n, size=k, replace=False))


def detect_consensus(model: Any, tokenizer: Any, harmful: Sequence[str], benign: Sequence[str], *, per_role: int,
                     resamples: int, consensus: float, modules: Sequence[str] = ("gate_proj", "up_proj"),
                     layers: Sequence[int] | None = None, detector: str = "mean_diff", threshold: float = 3.0,
                     min_weight: float = 0.0, max_neurons_per_module: int = 0, pool: str = "max", batch_size: int = 16,
                     max_length: int = 256, seed: int = 0, progress: Callable[[str, int, int], Any] | None = None,
                     cache: dict | None = None) -> Detection:
    """Stability selection: keep the neurons that ``detect`` picks on most subsamples of the prompts.

    Why: which neurons one detection sample yields decides most of a patch's ASR (a 3 x 3 cross
    of neuron set and training seed on SmolLM2: 57% of the variance, docs/RESULTS.md), so a
    neuron picked on one sample of 128 prompts a role but not on the next is a coin flip in the
    recipe. Here every prompt is pooled once; each of ``resamples`` seeded subsamples of
    ``per_role`` prompts a role is scored and thresholded as ``detect`` would; a neuron is kept
    when at least ``consensus`` of the subsamples chose it. Its recorded score and the profiles
    the clustering reads are over every prompt.

    Only the closed-form detectors: ``probe`` would fit ``resamples`` probes per module.

    Raises:
        InputError: the probe detector, bad ``resamples``/``consensus``, empty prompt sets, or no neuron kept.
    """
    if detector not in ("mean_diff", "gatebreaker"):
        raise InputError(f"--detect-resamples needs the mean_diff or gatebreaker detector, not {detector!r}")
    if resamples < 1 or not 0.0 < consensus <= 1.0:
        raise InputError(f"--detect-resamples must be >= 1 (got {resamples}) and --detect-consensus in (0, 1] (got {consensus})")
    refs, labels, acts = _labelled_activations(model, tokenizer, harmful, benign, modules=modules, layers=layers, pool=pool,
                                               max_length=max_length, batch_size=batch_size, progress=progress, cache=cache)
    rng = np.random.default_rng(seed)
    counts = {r.hf_name: np.zeros(acts[r.hf_name].shape[1], dtype=np.int64) for r in refs}
    picked = []
    for _ in range(resamples):
        rows = np.concatenate([_subsample(len(harmful), per_role, rng), len(harmful) + _subsample(len(benign), per_role, rng)])
        sub = gap_scores({n: x[rows] for n, x in acts.items()}, labels[rows], detector)
        n_sel = 0
        for r in refs:
            idx = select(sub[r.hf_name], threshold, min_weight, max_neurons_per_module)
            counts[r.hf_name][idx] += 1
            n_sel += len(idx)
        picked.append(n_sel)
    need = max(1, int(np.ceil(consensus * resamples - 1e-9)))
    full = gap_scores(acts, labels, detector)
    sel = []
    for r in refs:
        idx = np.flatnonzero(counts[r.hf_name] >= need).astype(np.int64)
        x = acts[r.hf_name]
        sel.append(ModuleSelection(r, int(x.shape[1]), idx, full[r.hf_name][idx], x[:, idx].copy()))
    union = int(sum((c > 0).sum() for c in counts.values()))
    det = Detection(detector, float(threshold), sel, len(harmful), len(benign), 0,
                    extra={"consensus": {"resamples": resamples, "min_share": consensus, "min_count": need,
                                         "prompts_per_resample": per_role, "selected_per_resample": picked,
                                         "selected_in_any": union}})
    _check_selected(det, threshold, min_weight, len(refs))
    log.info("consensus detection kept %d neurons chosen in >= %d of %d subsamples (each chose %d-%d; %d in any)",
             det.total_selected, need, resamples, min(picked), max(picked), union)
    return det
