"""The 128K context extension of MiniCPM4 ("YaRN-extended LongRoPE", MINICPM4.md §2.4).

The MiniCPM4 README / model card extend the 32K model to 131,072 tokens by replacing both LongRoPE factor
lists with one published 64-value list (head_dim 128, the 8B) and keeping original_max_position_embeddings
32768. CPM.cu hard-codes the same list (`--minicpm4-yarn`). That list is the shipped 8B factors times a
YaRN NTK-by-parts ramp with scale s = 4 (derived; see `yarn_ramp`):

    r(i) = 1 / ((1 - m(i)) / s + m(i)),   m(i) = clamp(1 - (i - 20) / 26, 0, 1),   i = 0 .. 63

so r = 1 for i <= 20 (high frequencies: extrapolate), r = 4 for i >= 46 (low frequencies: interpolate 4x),
and r(21..45) = 1.0297, 1.0612, 1.0947, ..., 3.25, 3.586 in between, the values MINICPM4.md §2.4 lists.
Check: published[63] / 4 = 124.0957 / 4 = 31.0239 (the shipped last factor); published[20] = 4.0487
(shipped idx 20, r = 1); published[21] / r(21) = 4.7527 / 1.0297 = 4.6156 (shipped idx 21). Dividing
the whole published list by r gives a smooth LongRoPE curve (tests/test_infllmv2_inference.py checks it).

Other head sizes (the 0.5B has head_dim 64 -> 32 factors): rotary pair i of a d-dim head turns at
theta^(-2i/d), the frequency of pair i * 128/d of a 128-dim head (same theta), and YaRN's ramp is a
function of frequency. So the same ramp evaluated at the fractional index i * 128 / d is multiplied
into the model's own factors: `factors_128k`. That derivation is ours, not published; the published list
is written verbatim for head_dim 128.
"""

from __future__ import annotations

from typing import Sequence

# Published 128K list (MINICPM4.md §2.4; README, model card and CPM.cu `apply_minicpm4_yarn_config`).
MINICPM4_8B_128K_FACTORS = [
    0.9977997200264581, 1.014658295992452, 1.0349680404997148, 1.059429246056193, 1.0888815016813513,
    1.1243301355211495, 1.166977103606075, 1.2182568066927284, 1.2798772354275727, 1.3538666751582975,
    1.4426259039919596, 1.5489853358570191, 1.6762658237220625, 1.8283407612492941, 2.0096956085876183,
    2.225478927469756, 2.481536379650452, 2.784415934557119, 3.1413289096347365, 3.560047844772632,
    4.048719380066383, 4.752651957515948, 5.590913044973868, 6.584005926629993, 7.7532214876576155,
    9.119754865903639, 10.704443927019176, 12.524994176518703, 14.59739595363613, 16.93214476166354,
    19.53823297353041, 22.417131025031697, 25.568260840911098, 28.991144156566317, 32.68408069090375,
    36.65174474170465, 40.90396065611201, 45.4664008671033, 50.37147343433591, 55.6804490772103,
    61.470816952306556, 67.8622707390618, 75.00516023410414, 83.11898235973767, 92.50044360202462,
    103.57086856690864, 116.9492274587385, 118.16074567836519, 119.18497548708795, 120.04810876261652,
    120.77352815196981, 121.38182790207875, 121.89094985353891, 122.31638758099915, 122.6714244963338,
    122.9673822552567, 123.21386397019609, 123.41898278254268, 123.58957065488238, 123.73136519024158,
    123.84917421274221, 123.94701903496814, 124.02825801299717, 124.09569231686116,
]

ORIGINAL_CONTEXT = 32768  # the list extends a model trained to 32K (original_max_position_embeddings)
EXTENDED_CONTEXT = 131072  # "validated up to 131,072 tokens" (README); 4x = the ramp's scale s
YARN_SCALE = 4.0
# Ramp end points in the 64-pair index space of a 128-dim head (fitted exactly to the published list).
RAMP_LOW, RAMP_HIGH, RAMP_PAIRS = 20.0, 46.0, 64


def yarn_ramp(num_pairs: int) -> list[float]:
    """r(i) for i in 0 .. num_pairs-1 (num_pairs = head_dim / 2), evaluated at the frequency-matched
    index i * 64 / num_pairs of the published 128-dim ramp."""
    out = []
    for i in range(num_pairs):
        x = i * RAMP_PAIRS / num_pairs
        m = min(max(1.0 - (x - RAMP_LOW) / (RAMP_HIGH - RAMP_LOW), 0.0), 1.0)  # 1 = keep, 0 = divide by s
        out.append(1.0 / ((1.0 - m) / YARN_SCALE + m))
    return out


def factors_128k(head_dim: int, trained_factors: Sequence[float]) -> list[float]:
    """The 128K factor list for a head of `head_dim` whose 32K-trained LongRoPE factors are given.

    head_dim 128: the published list, verbatim (the model-card instruction; it is the MiniCPM4-8B list).
    Other head sizes: trained factors x the frequency-matched ramp (derived, see the module doc).
    """
    if len(trained_factors) != head_dim // 2:
        raise ValueError(f"rope_scaling: expected head_dim/2 = {head_dim // 2} factors, got {len(trained_factors)}")
    if head_dim == 2 * RAMP_PAIRS:
        return list(MINICPM4_8B_128K_FACTORS)
    return [f * r for f, r in zip(trained_factors, yarn_ramp(head_dim // 2))]
