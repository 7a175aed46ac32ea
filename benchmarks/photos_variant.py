"""The "photos" variant of the scale benchmark (issue 18 item 1): synthetic 768-d unit vectors whose
neighbourhoods look like real photos' descriptors. Derivation, fitted parameters and the comparison
with the real photos: benchmarks/PHOTOS_VARIANT.md (figures measured by benchmarks/photo_neighbourhoods.py).

Interface (for benchmarks/bench_scale.py; numpy only, deterministic per seed and independent of how
many rows are asked for at once, as long as the chunk size is the same)::

    gen = PhotosVariant(seed=1, n=1_000_000, planted=10_000, params=FITTED)   # params optional
    for start, vectors in gen.chunks(chunk=50_000):     # float32 [rows, 768] unit rows, in row order
        ...                                             # start = index of the chunk's first row
    gen.planted_pairs()   # (a, b) int64 arrays: every original-copy and copy-copy pair (as bench_scale's)
    gen.originals         # int64 rows of the planted originals (the first `planted` rows)
    gen.copies            # int64 [planted, 2] rows of their two copies (rows planted .. 3 * planted - 1)
    gen.describe()        # one paragraph: the model and its parameters

    photos_vectors(n, seed, planted=0, params=FITTED)   # all rows at once (small n: tests, fitting)

    A class, not a pure chunk function: the state (which theme and scene each row joined) runs across
    chunks. Memory: one chunk of vectors plus the urns' bookkeeping (an int32 per row, a list entry
    per theme member: about 50 MB at 1M rows). Time at 1M: about 60 s on this 2-core machine.

Layout, as bench_scale.build's: rows 0..G-1 are the planted originals (ordinary rows of the model),
rows G..2G-1 and 2G..3G-1 their first and second copies, each at cosine U(0.8, 0.99) to its original
(bench_scale.copies_of); all other rows follow the model. The copies are in the first chunk, so
`chunk` must be >= 3 * planted (bench_scale uses max(50,000, 3 G)).

Model (every row, copies aside): v = normalise(sqrt(rho) c_t + sqrt((1 - rho) kappa) s_ts
+ sqrt((1 - rho)(1 - kappa)) e), where
  * e is the row's own background direction: z * sqrt(lambda) normalised, z ~ N(0, I), lambda_i ∝ i^-a
    (an anisotropic background: random pairs spread like real ones, sd ~ 0.09, not 1/sqrt(768));
  * t is the row's look-alike theme, drawn by a Pitman-Yor urn (concentration `theme_alpha`, discount
    `theme_discount`): a new theme with probability (alpha + discount K) / (alpha + i), else an existing
    theme k with probability ∝ n_k - discount. The urn is exchangeable and consistent: a random subset
    of m rows is itself a sample of m rows, so the figures at n = 500, 1,000, 2,000 and 1M come from
    one model (themes gain members as the collection grows, as real look-alike scenes do);
  * c_t is the theme's centre (drawn like e, from the theme's key), rho = the theme's tightness,
    U(rho_lo, rho_hi) (pairs in one theme sit near cosine rho);
  * s_ts is the row's scene inside its theme (bursts: near shots of one scene), a Chinese-restaurant
    urn per theme (concentration `scene_alpha`), kappa = the scene's extra tightness U(kappa_lo, kappa_hi).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DIM = 768
CHUNK = 50_000
COPIES = 2

B_RANK = 20  # b = cosine to the 20th nearest other file (neardup.neighbourhood)
QUANTILES = (0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99)
PAIR_THRESHOLDS = (0.4, 0.5, 0.55, 0.6, 0.7)
TAIL_QUANTILES = (0.99, 0.999, 0.9999)


# ---- measuring neighbourhoods (real or generated vectors) -----------------------------------------

def gram(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, np.float32)
    return v @ v.T


def b_values(g: np.ndarray, rank: int = B_RANK) -> np.ndarray:
    """Each row's cosine to its `rank`-th nearest other row, from the Gram matrix."""
    g = g.copy()
    np.fill_diagonal(g, -np.inf)
    return -np.partition(-g, rank - 1, axis=1)[:, rank - 1]


def _components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    parent = np.arange(n)

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    roots = np.array([find(x) for x in range(n)])
    return np.bincount(np.unique(roots, return_inverse=True)[1])


def neighbourhood_stats(vectors: np.ndarray, subsets=(500, 1000), seed: int = 0, subset_draws: int = 20) -> dict:
    """The figures PHOTOS_VARIANT.md compares: b quantiles (also the mean over `subset_draws` random
    subsets of each size in `subsets`), share of pairs above PAIR_THRESHOLDS, the all-pairs cosine
    distribution and its upper tail, and structure at 0.55 / 0.7."""
    n = len(vectors)
    g = gram(vectors)
    b = b_values(g)
    iu = np.triu_indices(n, 1)
    pairs = g[iu].astype(np.float64)
    neighbour = g.copy()
    np.fill_diagonal(neighbour, -np.inf)
    best = neighbour.max(axis=1)
    linked = pairs > 0.55
    sizes = _components(n, iu[0][linked], iu[1][linked])
    sizes = np.sort(sizes[sizes > 1])[::-1]
    out = {
        "n": n,
        "b_quantiles": {f"{q:g}": round(float(np.quantile(b, q)), 4) for q in QUANTILES},
        "b_mean": round(float(b.mean()), 4),
        "pairs_above": {f"{t:g}": float(f"{np.mean(pairs > t):.3g}") for t in PAIR_THRESHOLDS},
        "pair_cosine": {"mean": round(float(pairs.mean()), 4), "sd": round(float(pairs.std()), 4),
                        **{f"q{q:g}": round(float(np.quantile(pairs, q)), 4) for q in TAIL_QUANTILES}},
        "with_neighbour_above": {"0.55": int((best > 0.55).sum()), "0.7": int((best > 0.7).sum())},
        "components_0.55": {"count": int(len(sizes)), "photos": int(sizes.sum()),
                            "largest": [int(s) for s in sizes[:8]],
                            "size_counts": {str(k): int(v) for k, v in zip(*np.unique(sizes, return_counts=True))}},
    }
    rng = np.random.default_rng(seed)
    for m in subsets:
        if m >= n:
            continue
        qs = []
        for _ in range(subset_draws):
            pick = np.sort(rng.choice(n, m, replace=False))
            qs.append(np.quantile(b_values(g[np.ix_(pick, pick)]), QUANTILES))
        out[f"b_quantiles_n{m}"] = {f"{q:g}": round(float(v), 4) for q, v in zip(QUANTILES, np.mean(qs, axis=0))}
    return out


def format_stats(s: dict, title: str) -> str:
    lines = [f"{title}:"]
    for key in [k for k in s if k.startswith("b_quantiles")]:
        lines.append(f"  {key:16} " + " ".join(f"{q}:{v:.3f}" for q, v in s[key].items()))
    lines.append("  pairs above      " + " ".join(f">{t}: {v:.3g}" for t, v in s["pairs_above"].items()))
    lines.append("  pair cosine      " + " ".join(f"{k}={v}" for k, v in s["pair_cosine"].items()))
    lines.append(f"  neighbour above  {s['with_neighbour_above']}; components>0.55: {s['components_0.55']['count']} "
                 f"holding {s['components_0.55']['photos']}, largest {s['components_0.55']['largest']}, "
                 f"sizes {s['components_0.55']['size_counts']}")
    return "\n".join(lines)


# ---- the generator ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    spectrum: float = 0.5         # a: background eigenvalues lambda_i ∝ i^-a
    theme_alpha: float = 50.0     # Pitman-Yor concentration of the look-alike themes
    theme_discount: float = 0.5   # Pitman-Yor discount
    rho_lo: float = 0.2           # theme tightness rho ~ U(rho_lo, rho_hi)
    rho_hi: float = 0.5
    scene_alpha: float = 5.0      # Chinese-restaurant concentration of the scenes (bursts) in a theme
    kappa_lo: float = 0.3         # scene tightness kappa ~ U(kappa_lo, kappa_hi)
    kappa_hi: float = 0.8


#: fitted to the real photos (benchmarks/PHOTOS_VARIANT.md): Nelder-Mead from a hand start, then a grid
#: over 8 seeds per point (one seed's figures vary a lot: the Pitman-Yor urn's largest theme is random)
FITTED = Params(spectrum=0.70, theme_alpha=25.0, theme_discount=0.45, rho_lo=0.14, rho_hi=0.42,
                scene_alpha=10.0, kappa_lo=0.21, kappa_hi=0.55)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class PhotosVariant:
    """Rows of the photos variant, chunk by chunk; see the module docstring."""

    def __init__(self, seed: int, n: int, planted: int | None = None, params: Params = FITTED):
        self.seed, self.n, self.params = int(seed), int(n), params
        self.planted = min(10_000, n // 20) if planted is None else int(planted)
        g = self.planted
        self.originals = np.arange(g, dtype=np.int64)
        self.copies = np.stack([g * (1 + c) + np.arange(g, dtype=np.int64) for c in range(COPIES)], axis=1)
        self._scale = np.sqrt(np.arange(1, DIM + 1, dtype=np.float64) ** -params.spectrum)
        self._scale = (self._scale / np.sqrt(np.mean(self._scale ** 2))).astype(np.float32)

    # keyed background directions: a theme's centre or a scene's vector depends only on (seed, key)
    def _keyed(self, kind: int, keys: np.ndarray) -> np.ndarray:
        out = np.empty((len(keys), DIM), np.float32)
        for i, key in enumerate(keys.tolist()):
            out[i] = np.random.default_rng([self.seed, kind, key]).standard_normal(DIM, dtype=np.float32)
        return _unit(out * self._scale)

    def _background(self, rng, rows: int) -> np.ndarray:
        return _unit(rng.standard_normal((rows, DIM), dtype=np.float32) * self._scale)

    def chunks(self, chunk: int = CHUNK):
        """Yield (start, float32 [rows, DIM] unit vectors) for rows start.., in order, `chunk` rows at a time."""
        p = self.params
        if self.planted and chunk < (1 + COPIES) * self.planted:
            raise ValueError(f"chunk must be >= {(1 + COPIES) * self.planted} (the planted rows)")
        urn = np.random.default_rng([self.seed, 0])       # the urns (who is in which theme and scene)
        noise = np.random.default_rng([self.seed, 3])     # rows' own directions, copies
        theme_of = np.empty(self.n, np.int32)             # for the urn's draws: a uniform earlier row's theme
        theme_size: list[int] = []
        theme_rho: list[float] = []
        scenes: list[list[int]] = []                      # per theme: the scene of each member, in order
        scene_kappa: list[list[float]] = []
        model_row = 0                                     # rows drawn from the model so far (copies aside)
        g = self.planted
        for start in range(0, self.n, chunk):
            rows = min(chunk, self.n - start)
            model_rows = np.r_[np.arange(start, start + rows)]
            if start == 0 and g:
                model_rows = np.r_[np.arange(g), np.arange((1 + COPIES) * g, rows)]
            m = len(model_rows)
            themes = np.empty(m, np.int64)
            scene = np.empty(m, np.int64)
            rho = np.empty(m, np.float32)
            kappa = np.empty(m, np.float32)
            u = urn.random((m, 4))
            for r in range(m):
                i = model_row
                k_count = len(theme_size)
                if i == 0 or u[r, 0] * (p.theme_alpha + i) < p.theme_alpha + p.theme_discount * k_count:
                    t = k_count
                    theme_size.append(0)
                    theme_rho.append(p.rho_lo + (p.rho_hi - p.rho_lo) * u[r, 1])
                    scenes.append([])
                    scene_kappa.append([])
                else:
                    while True:  # existing theme k with probability ∝ n_k - discount (rejection from ∝ n_k)
                        t = int(theme_of[urn.integers(i)])
                        if urn.random() * theme_size[t] < theme_size[t] - p.theme_discount:
                            break
                size = theme_size[t]
                members = scenes[t]
                if size == 0 or u[r, 2] * (p.scene_alpha + size) < p.scene_alpha:
                    s = len(scene_kappa[t])
                    scene_kappa[t].append(p.kappa_lo + (p.kappa_hi - p.kappa_lo) * u[r, 3])
                else:
                    s = members[int(u[r, 2] * (p.scene_alpha + size) - p.scene_alpha) % size]
                members.append(s)
                theme_size[t] = size + 1
                theme_of[i] = t
                themes[r], scene[r] = t, s
                rho[r], kappa[r] = theme_rho[t], scene_kappa[t][s]
                model_row += 1
            vectors = np.empty((rows, DIM), np.float32)
            # keyed centres for this chunk's themes and scenes (a theme's key is its number)
            uniq_t, inv_t = np.unique(themes, return_inverse=True)
            scene_keys = themes * 1_000_003 + scene
            uniq_s, inv_s = np.unique(scene_keys, return_inverse=True)
            centre = self._keyed(1, uniq_t)[inv_t]
            scene_vec = self._keyed(2, uniq_s)[inv_s]
            e = self._background(noise, m)
            w_c = np.sqrt(rho)[:, None]
            w_s = np.sqrt((1 - rho) * kappa)[:, None]
            w_e = np.sqrt((1 - rho) * (1 - kappa))[:, None]
            vectors[model_rows - start] = _unit(w_c * centre + w_s * scene_vec + w_e * e)
            if start == 0 and g:
                for c in range(COPIES):
                    vectors[g * (1 + c): g * (2 + c)] = copies_of(noise, vectors[:g])
            yield start, vectors

    def planted_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Every planted pair (original-copy, original-copy 2, copy-copy), as bench_scale.build's."""
        g = np.arange(self.planted, dtype=np.int64)
        a = np.r_[g, g, self.planted + g]
        b = np.r_[self.planted + g, 2 * self.planted + g, 2 * self.planted + g]
        return a, b

    def describe(self) -> str:
        p = self.params
        return (f"photos variant: {self.n:,} x {DIM}-d unit vectors (seed {self.seed}), model of real photos' "
                f"descriptors (benchmarks/PHOTOS_VARIANT.md): anisotropic background (eigenvalues ∝ i^-{p.spectrum:g}); "
                f"look-alike themes from a Pitman-Yor urn (alpha {p.theme_alpha:g}, discount {p.theme_discount:g}), "
                f"theme tightness U({p.rho_lo:g}, {p.rho_hi:g}); bursts: scenes inside a theme from a Chinese-restaurant urn "
                f"(alpha {p.scene_alpha:g}), extra tightness U({p.kappa_lo:g}, {p.kappa_hi:g}); planted: {self.planted:,} "
                f"originals (rows 0..{self.planted - 1}) with {COPIES} copies each at cosine U(0.8, 0.99).")


def copies_of(rng, originals: np.ndarray) -> np.ndarray:
    """One copy of each original at cosine U(0.8, 0.99), as benchmarks/bench_scale.copies_of."""
    cos = rng.uniform(0.8, 0.99, len(originals)).astype(np.float32)
    noise = rng.standard_normal(originals.shape, dtype=np.float32)
    noise -= np.sum(noise * originals, axis=1, keepdims=True) * originals
    noise = _unit(noise)
    return _unit(cos[:, None] * originals + np.sqrt(1 - cos ** 2)[:, None] * noise)


def photos_vectors(n: int, seed: int, planted: int = 0, params: Params = FITTED) -> np.ndarray:
    """All n rows at once (for small n: fitting, tests)."""
    gen = PhotosVariant(seed, n, planted, params)
    return np.concatenate([v for _, v in gen.chunks(max(CHUNK, 3 * gen.planted))])


# ---- fitting (benchmarks/photo_neighbourhoods.py --fit) ----------------------------------------------

FIT_NAMES = ("spectrum", "theme_alpha", "theme_discount", "rho_lo", "rho_hi", "scene_alpha", "kappa_lo", "kappa_hi")


def fit_loss(real: dict, gen: dict) -> float:
    """Distance of generated figures to real ones: b quantiles at n and at the subset sizes (squared
    cosine differences), log ratio of the share of pairs above 0.4 (and 0.55, 0.7, half weight), the
    random-pair sd and upper-tail quantiles."""
    loss = 0.0
    for key in [k for k in real if k.startswith("b_quantiles")]:
        if key in gen:
            loss += sum((real[key][q] - gen[key][q]) ** 2 for q in real[key])
    for t, w in (("0.4", 0.02), ("0.55", 0.01), ("0.7", 0.01)):
        loss += w * math.log(max(gen["pairs_above"][t], 1e-7) / real["pairs_above"][t]) ** 2
    for k, w in (("sd", 4.0), ("q0.99", 1.0), ("q0.999", 1.0), ("q0.9999", 0.5)):
        loss += w * (real["pair_cosine"][k] - gen["pair_cosine"][k]) ** 2
    return loss


def fit(real: dict, n: int, seeds=(1, 2), start: Params = FITTED, iterations: int = 200, log=print) -> Params:
    """Nelder-Mead over FIT_NAMES (clipped to sane ranges), common random numbers across evaluations."""
    from scipy.optimize import minimize

    lo = np.array([0.0, 1.0, 0.0, 0.0, 0.05, 0.1, 0.0, 0.2])
    hi = np.array([1.5, 2000.0, 0.95, 0.6, 0.9, 200.0, 0.8, 0.95])

    def params_of(x):
        x = np.clip(x, lo, hi)
        d = dict(zip(FIT_NAMES, map(float, x)))
        d["rho_hi"] = max(d["rho_hi"], d["rho_lo"] + 0.01)
        d["kappa_hi"] = max(d["kappa_hi"], d["kappa_lo"] + 0.01)
        return Params(**d)

    def loss(x):
        p = params_of(x)
        value = float(np.mean([fit_loss(real, neighbourhood_stats(photos_vectors(n, s, 0, p), subsets=(500, 1000),
                                                                    seed=s, subset_draws=5)) for s in seeds]))
        log(f"  loss {value:.5f} {p}")
        return value

    x0 = np.array([getattr(start, k) for k in FIT_NAMES], float)
    res = minimize(loss, x0, method="Nelder-Mead",
                   options={"maxfev": iterations, "initial_simplex": None, "xatol": 1e-3, "fatol": 1e-6})
    return params_of(res.x)
