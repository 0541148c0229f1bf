"""ATLAS, OmegaNet and the Miras models as block kinds: "atlas", "omeganet", "moneta",
"yaad", "memora".

Each is the memory-as-a-layer block of Titans (`models.titans.LMMBlock`: x +
NeuralMemory(RMSNorm(x)), then + SwiGLU(RMSNorm(.))) with one point of the Miras design
space as its defaults — the same `layers.neural_memory.NeuralMemory`, other choices of
`MemorySpec` and feature map, nothing copied. Every default is an option of `model.<kind>`
(the list is in `models.titans`), so `--config.model.moneta.lq_q=2` is a different Moneta,
and every kind mixes with the others in `model.block_pattern`, e.g. ("atlas", "swa").

ATLAS (Behrouz et al. 2025, "Atlas: Learning to Optimally Memorize the Context at Test
Time", arXiv 2505.23735):

    atlas     Omega rule (eq. 9: the memory's gradient is that of the γ-gated sum of the
              ℓ2 losses of the last c tokens) + polynomial features φ on q, k (§3.1) +
              Newton-Schulz-orthogonalised momentum (the "Muon" rule, §3.3), gated decay.
              `feature_map="monomial"` is the paper's φ_p(x) = [x^β]_{|β|<=p} (keys of
              Σ_i C(d+i-1, i) features); the shipped default is still the element-wise
              "polynomial" map (`layers.feature_maps`), for the reason below.
    omeganet  the same Omega rule and features, plain gradient descent.

Miras (Behrouz et al. 2025, "It's All Connected: A Journey Through Test-Time Memorization,
Attentional Bias, Retention, and Online Optimization", arXiv 2504.13173, §5):

    moneta    ℓp attentional bias with p = 3, ℓq retention (normalisation) with q = 4.
    yaad      Huber attentional bias with a data-dependent threshold δ_t, gated decay
              (Miras' ℓ2 retention). Departure: outside the threshold the update is
              δ_t e / ‖e‖₂ ("huber_norm", the Huber loss of ‖e‖₂) rather than eq. 26's
              δ_t Sign(e) (bias="huber"): Sign(e) writes √Dv times the ℓ2 update at the
              switch, past the inner step's stability edge, and MQAR runs fell from
              90-99.7% recall to 47-82% once tokens took it
              (benchmarks/results/yaad_huber.md).
    memora    ℓ2 attentional bias, KL retention (softmax over the memory, in log space).

The three Miras models take one gradient step per token (rule "gd"), as their update rules
in Miras §5 do. Memory: the MLP of depth 2 of our Titans blocks (Miras and ATLAS use deep
MLP memories; the hidden width here is `expansion` = 2 times the head dim).

Departures and our choices (the papers give ablations, not single values, or sizes far
larger than this codebase's tests and CPU runs): Omega window c = 4 and polynomial degree
p = 2 (the smallest that adds a term) with learnable coefficients initialised to 1/i!
(`layers.feature_maps`); the default map is the element-wise one, which keeps the head
dimension and so cannot raise capacity past O(d). Past it the paper's map is what recalls
(MQAR, 16 pairs at head_dim 8, 2,000 steps: 90% / 69% at seeds 0 / 1 against 7% / 5%), but
at the configs' 8 pairs and head_dim 32 the element-wise map already recalls 99% and the
monomial one (Dk 560) makes the layer 3.7x slower (`benchmarks/results/atlas_features.md`);
so "monomial" is the option for tasks whose pairs exceed the head dimension;
the Omega gates γ_i are a sigmoid of the token (init 1/2) by default; eq. 9 writes
γ_i^(t), a gate per (t, i) pair, which `omega_gates="pair"` builds (token t brings c gates,
one per slot of its window; the MQAR comparison is in `benchmarks/results/atlas_features.md`);
Yaad's δ_t = softplus(x W_δ + b) (init 2√head_dim, twice a typical error at init: see
`layers.neural_memory` for why not √head_dim);
Newton-Schulz with Muon's 5 steps and (3.4445, -4.7750, 2.0315); Memora's initial
log-weights N(0, 1) (`layers.neural_memory_init.log_probability_init`). The chunk-parallel
training form takes each gradient at the chunk-start memory (Titans §3.2), as for every
deep memory here. θ is capped at the inner step's stability edge
(`layers.neural_memory_init.default_lr_max`), which for Moneta includes its ℓq step gain and ℓ3
curvature (0.016 at head_dim 32: at 0.1 it recalled MQAR at chance,
benchmarks/results/moneta_step.md); ATLAS and Memora keep 0.1.

Training forms: Moneta and Memora train in their paper's own parallel forms (Miras §5.4),
which run a chunk in the linear attention-like form of the Titans LMM instead of
materialising every token's weights (speed and learning:
benchmarks/results/miras_parallel_forms.md). Moneta, `lq_normaliser="chunk_start"`: the ℓq
normalisation at chunk boundaries only (a chunk reads A_t / ||A_{c0}||_q^(q-2)); its
learning is the same as with eq. 24 at every token within Moneta's spread across seeds
and machines. Memora, `kl_chunk_form="lag_token"`: eq. 27 at each chunk's first token,
additive steps on that token's weights after it; it recalls MQAR where eq. 27 at every
token did not, text unchanged. `lq_normaliser="token"` / `kl_chunk_form="exact"` train
eqs. 24 / 27 at every token. Decoding (`models.generate`) reproduces the chunked forward,
so it runs the training form; `impl="reference"` is eqs. 24 / 27 token by token.
"""

from models.titans import MEMORY_DEFAULTS, LMMBlock, register_memory_block

OMEGA_WINDOW = 4
POLYNOMIAL_DEGREE = 2

_OMEGA = {
    "omega_window": OMEGA_WINDOW,
    "feature_map": "polynomial",
    "feature_degree": POLYNOMIAL_DEGREE,
}

KIND_DEFAULTS = {
    "atlas": {**_OMEGA, "rule": "muon"},
    "omeganet": {**_OMEGA, "rule": "gd"},
    "moneta": {
        "bias": "lp",
        "lp_p": 3.0,
        "retention": "lq",
        "lq_q": 4.0,
        "lq_normaliser": "chunk_start",
        "rule": "gd",
    },
    "yaad": {"bias": "huber_norm", "retention": "gated_decay", "rule": "gd"},
    "memora": {"bias": "l2", "retention": "kl", "kl_chunk_form": "lag_token", "rule": "gd"},
}

for _kind, _overrides in KIND_DEFAULTS.items():
    register_memory_block(_kind, LMMBlock, {**MEMORY_DEFAULTS, **_overrides})
