"""Time schedules and training-free ODE solvers for diffusion sampling, in EDM form.

The convention of the whole project (SFD paper Sec. 2.1, Eq. 2-4; Karras et al. 2022):
a noisy sample is `x_t = x_0 + t * eps`, so the noise level *is* the time (sigma = t), and a
denoiser `D(x, t) ~ E[x_0 | x_t]` defines the noise prediction and the probability-flow ODE

    eps(x, t) = (x - D(x, t)) / t,        dx/dt = eps(x, t)                  (SFD Eq. 4)

Sampling draws `x = t_max * z` and integrates from `t_steps[0] = t_max` down to `t_steps[-1]`.
Every solver below is one generator over a whole schedule with the same signature,
`solver(denoiser, x, t_steps, afs=False, **cond)`, yielding the n + 1 states; `sample` drives it.

Solvers (NFE = network calls for n steps; AFS saves exactly one, SFD Sec. 3.2):
    euler    Euler = DDIM (Song et al. 2021)                           n
    heun     EDM's 2nd-order Heun (Karras et al. 2022, Alg. 1)          2n  (2n - 1 ending at 0)
    dpm2     DPM-Solver-2, single-step (Lu et al. 2022a)                2n  (2n - 1 ending at 0)
    ipndm    improved PNDM, Adams-Bashforth orders 1-4 (Zhang & Chen 2023)  n
    dpmpp2m  DPM-Solver++(2M), multistep, data prediction (Lu et al. 2022b)  n
    dpmpp3m  DPM-Solver++(3M)                                           n

plus Meng et al.'s stochastic N-step sampler (Meng Eq. 4-7), which works for any denoiser.

Run `python solvers.py` to print each solver's error against the exact solution of a Gaussian.
"""

import math
import warnings
from dataclasses import asdict, dataclass, fields

import torch

# ---------------------------------------------------------------------------------------------
# Time schedules
# ---------------------------------------------------------------------------------------------

SCHEDULES = ('polynomial', 'logsnr', 'time_uniform')


def time_schedule(n, t_min=0.002, t_max=80., kind='polynomial', rho=7., device=None):
    """n + 1 strictly decreasing timestamps from t_max to t_min (float64).

    Every kind is a fixed function of the fraction u = i / n, so refining a schedule K times
    keeps its points: `time_schedule(K * n)[::K] == time_schedule(n)` exactly. That is how SFD's
    teacher grid contains the student's grid (SFD Alg. 4: K teacher steps per student step).

    polynomial    EDM's rho schedule (Karras et al. Eq. 5):
                  t_i = (t_max^(1/rho) + u (t_min^(1/rho) - t_max^(1/rho)))^rho.
    logsnr        uniform in log t (= uniform in half the log-SNR): t_i = t_max (t_min/t_max)^u.
    time_uniform  DPM-Solver's VP time grid mapped to sigma: VP time tau runs from 1 to
                  eps_s = 1e-3 as tau = (1 + u (eps_s^(1/rho) - 1))^rho and sigma(tau) is the
                  VP-SDE's noise-to-signal ratio, with the linear beta schedule solved so that
                  sigma(1) = t_max and sigma(eps_s) = t_min. Only rho = 1 makes it uniform in
                  time; with rho != 1 (the default 7) the grid is crowded near tau = eps_s,
                  i.e. it is *not* time-uniform.
    """
    if int(n) != n or n < 1:
        raise ValueError(f'a schedule needs n >= 1 steps, got {n}')
    if not (0 < t_min < t_max < math.inf):
        raise ValueError(f'need 0 < t_min < t_max < inf, got t_min={t_min}, t_max={t_max}')
    if not 0 < rho < math.inf:
        raise ValueError(f'rho must be positive and finite, got {rho}')
    if kind == 'polynomial':
        f = lambda u: (t_max ** (1 / rho) + u * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho
    elif kind == 'logsnr':
        f = lambda u: t_max * (t_min / t_max) ** u
    elif kind == 'time_uniform':
        eps_s = 1e-3
        # VP-SDE with linear beta(tau) = beta_min + beta_d * tau has log(1 + sigma^2) =
        # beta_d tau^2 / 2 + beta_min tau; pick beta_d, beta_min to hit both end points.
        L_min, L_max = math.log1p(t_min ** 2), math.log1p(t_max ** 2)
        beta_d = 2 * (L_min / eps_s - L_max) / (eps_s - 1)
        beta_min = L_max - beta_d / 2
        tau = lambda u: (1 + u * (eps_s ** (1 / rho) - 1)) ** rho
        f = lambda u: math.sqrt(math.expm1(beta_d * tau(u) ** 2 / 2 + beta_min * tau(u)))
    else:
        raise ValueError(f'unknown schedule {kind!r}; choose one of {SCHEDULES}')
    # Scalar double arithmetic per point: equal fractions i/n give bit-identical timestamps
    # (vectorised pow may round differently from lane to lane).
    t = torch.tensor([f(i / n) for i in range(n + 1)], dtype=torch.float64, device=device)
    t[0], t[-1] = t_max, t_min  # exact end points (no round-off at either end)
    return t


def append_zero(t_steps):
    """EDM's sampler appends t = 0: the last step then lands on the denoiser's output."""
    return torch.cat([t_steps, t_steps.new_zeros(1)])


# ---------------------------------------------------------------------------------------------
# Shared pieces of every solver
# ---------------------------------------------------------------------------------------------

def _eps(denoiser, x, t, cond):
    """eps(x, t) = (x - D(x, t)) / t (SFD Eq. 4). `t` is a float or a per-sample [B] tensor; the
    denoiser always receives a [B] tensor."""
    if torch.is_tensor(t):
        t_b = t.to(x.dtype).expand(x.shape[0])
        t = t_b.reshape(-1, *[1] * (x.ndim - 1))  # broadcast over the sample dimensions
    else:
        t_b = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    return (x - denoiser(x, t_b, **cond).to(x.dtype)) / t


def afs_eps(x, t):
    """SFD Sec. 3.2 / Alg. 5, line 2: the analytical first step's noise estimate.

    At t_max the data are negligible next to the noise: for unit-scale data x_t ~ N(0, (1 + t^2) I),
    and the standardised sample x / sqrt(1 + t^2) estimates eps. (The optimal eps of N(0, I) data,
    x t / (1 + t^2), differs by the factor t / sqrt(1 + t^2) = 1 - O(1 / t^2).) One call saved.
    """
    return x / math.sqrt(1 + t * t)


def _eps_first(denoiser, x, t, cond, afs, i):
    """The direction at the start of step i: analytic on the first step with AFS, else a call."""
    return afs_eps(x, t) if (afs and i == 0) else _eps(denoiser, x, t, cond)


def euler_step(denoiser, x, t_cur, t_next, **cond):
    """One Euler (= DDIM) step from t_cur to t_next: the SFD student's update (SFD Eq. 6).

    x_next = x + (t_next - t_cur) * eps(x, t_cur). Times are floats or per-sample [B] tensors.
    Gradients flow through the denoiser call, which is what distillation trains.
    """
    if torch.is_tensor(t_cur) or torch.is_tensor(t_next):
        h = (torch.as_tensor(t_next) - torch.as_tensor(t_cur)).to(x).expand(x.shape[0])
        return x + h.reshape(-1, *[1] * (x.ndim - 1)) * _eps(denoiser, x, torch.as_tensor(t_cur).to(x), cond)
    return x + (t_next - t_cur) * _eps(denoiser, x, t_cur, cond)


def _times(t_steps):
    """Validate a schedule and return it as Python floats (solver arithmetic in double)."""
    t = [float(v) for v in torch.as_tensor(t_steps).flatten()]
    if len(t) < 2:
        raise ValueError('a schedule needs at least 2 timestamps (one step)')
    if not all(math.isfinite(v) for v in t):
        raise ValueError(f'timestamps must be finite, got {t}')
    if any(a <= b for a, b in zip(t, t[1:])) or min(t[:-1]) <= 0 or t[-1] < 0:
        raise ValueError('timestamps must be strictly decreasing and positive (only the last may be 0)')
    return t


# ---------------------------------------------------------------------------------------------
# Single-step solvers
# ---------------------------------------------------------------------------------------------

def euler(denoiser, x, t_steps, afs=False, **cond):
    """Euler / DDIM: x_{i+1} = x_i + h_i eps(x_i, t_i), h_i = t_{i+1} - t_i (SFD Eq. 6)."""
    t = _times(t_steps)
    yield x
    for i, (t_cur, t_next) in enumerate(zip(t, t[1:])):
        x = x + (t_next - t_cur) * _eps_first(denoiser, x, t_cur, cond, afs, i)
        yield x


def heun(denoiser, x, t_steps, afs=False, **cond):
    """EDM's Heun (Karras et al. Alg. 1 without churn): an Euler predictor at t_{i+1}, then the
    trapezoidal corrector x_{i+1} = x_i + h (d_i + d'_i) / 2.

    The corrector is skipped on a step to t = 0 (eps is undefined there): as in EDM's sampler,
    that step is plain Euler. At t_{i+1} = t_min > 0 it is applied, as in the official SFD code.
    """
    t = _times(t_steps)
    yield x
    for i, (t_cur, t_next) in enumerate(zip(t, t[1:])):
        h = t_next - t_cur
        d = _eps_first(denoiser, x, t_cur, cond, afs, i)
        x_pred = x + h * d
        if t_next > 0:
            x_pred = x + h * (d + _eps(denoiser, x_pred, t_next, cond)) / 2
        x = x_pred
        yield x


def dpm2(denoiser, x, t_steps, afs=False, **cond):
    """DPM-Solver-2 (Lu et al. 2022a, Alg. 1 with r = 1/2) in EDM form.

    The intermediate point is the midpoint in lambda = -log t, i.e. t_mid = sqrt(t_i t_{i+1});
    an Euler step reaches it and the slope there carries the full step: x_{i+1} = x_i + h eps_mid.
    For a VE/EDM process this is exactly DPM-Solver-2's noise-prediction update. A step to
    t = 0 has no log-midpoint and is plain Euler (as in k-diffusion).
    """
    t = _times(t_steps)
    yield x
    for i, (t_cur, t_next) in enumerate(zip(t, t[1:])):
        d = _eps_first(denoiser, x, t_cur, cond, afs, i)
        if t_next == 0:
            x = x + (t_next - t_cur) * d
        else:
            t_mid = math.sqrt(t_cur * t_next)
            x_mid = x + (t_mid - t_cur) * d
            x = x + (t_next - t_cur) * _eps(denoiser, x_mid, t_mid, cond)
        yield x


# ---------------------------------------------------------------------------------------------
# Multistep solvers
# ---------------------------------------------------------------------------------------------

# Adams-Bashforth coefficients on the newest-first history of eps (equal-step formulas).
_AB = {1: (1,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
       4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ipndm(denoiser, x, t_steps, afs=False, max_order=4, **cond):
    """Improved PNDM (Zhang & Chen 2023, "DEIS" App.; Liu et al. 2022): explicit Adams-Bashforth
    on the ODE direction, x_{i+1} = x_i + h_i sum_j b_j eps_{i-j}, with a low-order warm-up
    (order min(max_order, i + 1) at step i, no lower-order final steps; a step to t = 0 is Euler).

    The coefficients assume equal steps but are used unchanged on non-uniform schedules, as the
    official code does; so its convergence order on a given schedule is measured, not assumed.
    With AFS the analytic first direction enters the history like any other.
    """
    if not 1 <= max_order <= 4:
        raise ValueError(f'ipndm supports max_order 1..4, got {max_order}')
    t = _times(t_steps)
    history = []  # eps_i, eps_{i-1}, ... newest first
    yield x
    for i, (t_cur, t_next) in enumerate(zip(t, t[1:])):
        history = [_eps_first(denoiser, x, t_cur, cond, afs, i)] + history[:max_order - 1]
        b = _AB[len(history) if t_next > 0 else 1]  # a step to t = 0 is plain Euler: it lands on D
        x = x + (t_next - t_cur) * sum(b_j * d_j for b_j, d_j in zip(b, history))
        yield x


def dpmpp_order(i, n, max_order, lower_order_final=True):
    """Order of multistep DPM-Solver++ at step i of n: warm up 1, 2, 3, then (by default) fall
    back to lower orders on the final steps: p_i = i + 1 while i + 1 < max_order, else
    min(max_order, n - i). SFD's teacher applies this at every n, the original DPM-Solver only
    for n < 10. Quirk kept for parity with the official SFD code: with n = 2, max_order 3 gives
    orders [1, 2] while max_order 2 gives [1, 1].
    """
    if i + 1 < max_order:
        return i + 1
    return min(max_order, n - i) if lower_order_final else max_order


def _dpmpp(denoiser, x, t_steps, afs, max_order, lower_order_final, full_third_order, cond):
    """Multistep DPM-Solver++ (Lu et al. 2022b, Alg. 2 and its 3rd-order extension) in EDM form.

    With lambda = -log t, the exact solution from s to t is (DPM-Solver++ Eq. 9 with alpha = 1)
        x_t = (t / s) x_s + int_0^h e^{u - h} D(lambda_s + u) du,    h = lambda_t - lambda_s,
    and D is expanded around the newest denoised value D_0 (at s_0): D_0 + D' u + D'' u^2 / 2.
    The three integrals are -phi_1, h phi_2 and -h^2 phi_3 with
        phi_1 = expm1(-h) = t / s_0 - 1,   phi_2 = phi_1 / h + 1,   phi_3 = phi_2 / h - 1/2,
    so x_t = (t/s_0) x - phi_1 D_0 + phi_2 (h D') - phi_3 (h^2 D''). The derivatives come from
    divided differences of the stored D_0, D_-1, D_-2 (at s_0, s_1, s_2), with r_0 = h_0 / h,
    r_1 = h_1 / h (h_0 = lambda_{s_0} - lambda_{s_1}, h_1 = lambda_{s_1} - lambda_{s_2}):
        D1_0 = (D_0 - D_-1) / r_0,  D1_1 = (D_-1 - D_-2) / r_1,
        D1 = D1_0 + r_0 / (r_0 + r_1) (D1_0 - D1_1) ~ h D',   D2 = (D1_0 - D1_1) / (r_0 + r_1) ~ h^2 D'' / 2.
    The updates:
        order 1:  x_t = (t/s_0) x - phi_1 D_0                         (= Euler / DDIM)
        order 2:  x_t = (t/s_0) x - phi_1 D_0 - phi_1 D1_0 / 2
        order 3:  x_t = (t/s_0) x - phi_1 D_0 + phi_2 D1 - phi_3 D2    (published form)
    Since D2 ~ h^2 D'' / 2, the published third-order update (DPM-Solver's code, k-diffusion, the
    official SFD teacher) carries half of the D'' term: its local error stays O(h^3), so it
    converges with global order 2 (measured in tests/test_solvers.py). `full_third_order=True`
    uses 2 phi_3 D2 and converges with order 3. The default keeps the published form: it is
    SFD's teacher, and parity with it matters more here than the order.
    No dynamic thresholding: EDM data are not bounded to [-1, 1] at intermediate steps, and it
    would bias the endpoint.
    """
    if not 1 <= max_order <= 3:
        raise ValueError(f'DPM-Solver++ supports max_order 1..3, got {max_order}')
    t = _times(t_steps)
    n = len(t) - 1
    lam = lambda s: -math.log(s)
    Ds, ss = [], []  # newest-first history of denoised values and their times
    yield x
    for i, (t_cur, t_next) in enumerate(zip(t, t[1:])):
        # The denoised value at t_cur; with AFS the first one is x - t eps_AFS (SFD Alg. 5).
        D = x - t_cur * _eps_first(denoiser, x, t_cur, cond, afs, i)
        Ds, ss = [D] + Ds[:2], [t_cur] + ss[:2]
        p = min(dpmpp_order(i, n, max_order, lower_order_final), len(Ds))
        if t_next == 0:
            p = 1  # lambda = +inf at t = 0: the first-order update returns D_0 exactly
        ratio = t_next / t_cur
        phi_1 = ratio - 1
        x = ratio * x - phi_1 * Ds[0]
        if p >= 2:
            h = lam(t_next) - lam(ss[0])
            r0 = (lam(ss[0]) - lam(ss[1])) / h
            D1_0 = (Ds[0] - Ds[1]) / r0
            if p == 2:
                x = x - 0.5 * phi_1 * D1_0
            else:
                r1 = (lam(ss[1]) - lam(ss[2])) / h
                D1_1 = (Ds[1] - Ds[2]) / r1
                D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
                D2 = (D1_0 - D1_1) / (r0 + r1)
                phi_2 = phi_1 / h + 1
                phi_3 = phi_2 / h - 0.5
                x = x + phi_2 * D1 - (2 if full_third_order else 1) * phi_3 * D2
        yield x


def dpmpp2m(denoiser, x, t_steps, afs=False, lower_order_final=True, **cond):
    """DPM-Solver++(2M): multistep, second order (see `_dpmpp`)."""
    return _dpmpp(denoiser, x, t_steps, afs, 2, lower_order_final, False, cond)


def dpmpp3m(denoiser, x, t_steps, afs=False, lower_order_final=True, full_third_order=False, **cond):
    """DPM-Solver++(3M): multistep with third-order history, SFD's default teacher (see `_dpmpp`)."""
    return _dpmpp(denoiser, x, t_steps, afs, 3, lower_order_final, full_third_order, cond)


SOLVERS = {'euler': euler, 'heun': heun, 'dpm2': dpm2, 'ipndm': ipndm,
           'dpmpp2m': dpmpp2m, 'dpmpp3m': dpmpp3m}
_CALLS_PER_STEP = {'euler': 1, 'heun': 2, 'dpm2': 2, 'ipndm': 1, 'dpmpp2m': 1, 'dpmpp3m': 1}


def _solver(name):
    if name not in SOLVERS:
        raise ValueError(f'unknown solver {name!r}; choose one of {", ".join(SOLVERS)}')
    return SOLVERS[name]


def nfe(solver, n, afs=False, ends_at_zero=False):
    """Network calls for n steps: the true count `sample` makes.

    Two-stage solvers (heun, dpm2) make one call on a final step to t = 0 (EDM's schedule with a
    trailing 0), and AFS replaces exactly one call by the analytic first step.
    """
    _solver(solver)
    if n < 1:
        raise ValueError(f'need at least one step, got n={n}')
    count = _CALLS_PER_STEP[solver] * n - (ends_at_zero and _CALLS_PER_STEP[solver] == 2) - bool(afs)
    if count < 1:
        raise ValueError(f'{solver} with {n} step(s) and AFS makes no network call: use more steps')
    return count


def steps_for_nfe(solver, nfe_budget, afs=False, ends_at_zero=False):
    """The number of steps n with `nfe(solver, n, afs, ends_at_zero) == nfe_budget`, or an error."""
    for n in range(1, nfe_budget + 2):
        try:
            if nfe(solver, n, afs, ends_at_zero) == nfe_budget:
                return n
        except ValueError:
            continue
    options = [nfe(solver, n, afs, ends_at_zero) for n in range(2, 6)]
    raise ValueError(f'{solver} cannot use exactly {nfe_budget} NFE (afs={afs}, ends_at_zero='
                     f'{ends_at_zero}); possible values include {options}')


@torch.no_grad()
def sample(denoiser, x, t_steps, solver='heun', afs=False, trajectory=False, max_order=None,
           lower_order_final=True, full_third_order=False, **cond):
    """Integrate the PF-ODE dx/dt = eps(x, t) over `t_steps` with a named solver.

    `x` is the starting state at t_steps[0] (the caller scales the noise: x = t_max * z).
    Returns the final state, or with `trajectory=True` a tensor [n + 1, *x.shape] of all states.
    `max_order` applies to ipndm (default 4); `lower_order_final` to dpmpp2m/dpmpp3m and
    `full_third_order` to dpmpp3m. Other keywords are conditions for the denoiser
    (`class_labels`, `step`, `guidance`).
    Runs without gradients; distillation uses `euler_step` for the student instead.
    """
    fn = _solver(solver)
    t = _times(t_steps)
    nfe(solver, len(t) - 1, afs, ends_at_zero=t[-1] == 0)  # a clear error if no call is left
    options = {}
    if solver == 'ipndm':
        options['max_order'] = 4 if max_order is None else max_order
    elif max_order is not None:
        raise ValueError(f'max_order applies to ipndm only (dpmpp2m/dpmpp3m fix theirs), not {solver}')
    if solver.startswith('dpmpp'):
        options['lower_order_final'] = lower_order_final
    if solver == 'dpmpp3m':
        options['full_third_order'] = full_third_order
    elif full_third_order:
        raise ValueError(f'full_third_order applies to dpmpp3m only, not {solver}')
    states = fn(denoiser, x, t_steps, afs=afs, **options, **cond)
    if trajectory:
        return torch.stack(list(states))
    for x in states:  # run the generator to the end, keeping only the latest state
        pass
    return x


# ---------------------------------------------------------------------------------------------
# The sampling recipe: how a model is sampled, stored in every model file
# ---------------------------------------------------------------------------------------------

RECIPE_VERSION = 1  # files written before recipes had a version are read as version 0


@dataclass
class Recipe:
    """How to sample a model: a solver over a schedule (or an explicit grid) at one or more NFE.

    The defaults are EDM's sampler (Karras et al. 2022, Alg. 1): Heun on the rho = 7 polynomial
    schedule from 80 to 0.002 and a last step to t = 0, 35 NFE. An SFD student stores Euler over
    its own schedule (SFD Alg. 8), with AFS and SFD-v's step values if trained with them; a Meng
    stage-two student stores its cosine grid (`t_steps`) and DDIM ('euler') or 'stochastic'.
    Model files hold `to_dict()`, which torch.load(weights_only=True) reads; `schedule_for` is
    the one function that turns a recipe into timestamps and conditions.
    """
    solver: str = 'heun'         # a name in SOLVERS, or 'stochastic' (Meng Eq. 4-7)
    nfe: int | list = 35         # network calls per sample; a list for a model trained at several
    afs: bool = False            # SFD's analytical first step (Sec. 3.2): one call saved
    schedule: str = 'polynomial'  # a time_schedule kind (ignored when t_steps is given)
    rho: float = 7.0
    t_min: float = 0.002
    t_max: float = 80.0
    ends_at_zero: bool = True    # append t = 0: the last step lands on the denoiser's output (EDM)
    t_steps: list | None = None  # an explicit grid, largest first (fixes the NFE)
    step_values: dict | None = None  # SFD-v: {str(nfe): step condition} per trained NFE
    version: int = RECIPE_VERSION

    def nfes(self):
        """The NFE this recipe was made for, as a list."""
        return list(self.nfe) if isinstance(self.nfe, (list, tuple)) else [self.nfe]

    def to_dict(self):
        """A plain dict (lists, not tuples) for model files and JSON."""
        d = asdict(self)
        d['nfe'] = self.nfes() if isinstance(self.nfe, (list, tuple)) else self.nfe
        return d

    @classmethod
    def from_dict(cls, d):
        """Read a stored recipe. Version 0 (no 'version' key) left out keys that meant afs=False,
        ends_at_zero=False and no step values; its stage-two guided files had no rho."""
        if isinstance(d, Recipe):
            return d
        if not isinstance(d, dict) or 'solver' not in d or 'nfe' not in d:
            raise ValueError(f'not a sampling recipe: {d!r}')
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f'unknown keys {sorted(unknown)} in sampling recipe {d!r}')
        if d.get('version', 0) > RECIPE_VERSION:
            raise ValueError(f'recipe version {d["version"]} is newer than this code ({RECIPE_VERSION})')
        old = {} if 'version' in d else dict(afs=False, ends_at_zero=False)
        return cls(**{**old, **d, 'version': RECIPE_VERSION})


def schedule_for(recipe, nfe=None, warn=True):
    """(t_steps, nfe, cond): the timestamps and conditions a recipe prescribes for one NFE.

    `nfe` picks one of the trained NFE (SFD-v); a single-NFE recipe needs none. An explicit grid
    is used as stored. 'stochastic' (Meng Eq. 4-7) makes one call per grid point below t_max:
    N = NFE steps. Otherwise the NFE becomes a step count (steps_for_nfe: a clear error if no
    count fits). `cond` holds SFD-v's step condition: the stored value of that NFE, or for an
    untrained NFE (with a warning) the number of timestamps, the rule distill.py trains with.
    """
    r = Recipe.from_dict(recipe)
    trained = r.nfes()
    if nfe is None:
        if len(trained) > 1:
            raise ValueError(f'this model samples at NFE {trained}: choose one with --nfe (nfe=)')
        nfe = trained[0]
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f'NFE must be a positive integer, got {nfe!r}')
    if r.t_steps is not None:
        if nfe != trained[0]:
            raise ValueError(f'this model samples its stored grid at NFE {trained[0]} only, not {nfe}')
        t = torch.tensor(r.t_steps, dtype=torch.float64)
    elif r.solver == 'stochastic':
        t = time_schedule(nfe, r.t_min, r.t_max, r.schedule, r.rho)
    else:
        n = steps_for_nfe(r.solver, nfe, r.afs, r.ends_at_zero)
        t = time_schedule(n - r.ends_at_zero, r.t_min, r.t_max, r.schedule, r.rho)
        t = append_zero(t) if r.ends_at_zero else t
    _times(t)  # finite and decreasing
    cond = {}
    if r.step_values is not None:
        step = r.step_values.get(str(nfe))
        if step is None:
            step = len(t)
            if warn:
                warnings.warn(f'NFE {nfe} was not trained (step values {r.step_values}); using step={step}, '
                              'the number of timestamps', stacklevel=2)
        cond['step'] = step
    return t, nfe, cond


def sample_with(denoiser, z, recipe, nfe=None, generator=None, **cond):
    """Generate from unit noise z as a recipe says (SFD Alg. 8 for students): x = t_max z, then
    its solver over its schedule with its conditions (an explicit step= wins, e.g. to probe an
    untrained NFE). `generator` feeds the stochastic sampler (one or one per sample)."""
    r = Recipe.from_dict(recipe)
    t_steps, _, rc = schedule_for(r, nfe, warn='step' not in cond)  # an explicit step= is not a mistake
    cond = {**rc, **cond}
    x = float(t_steps[0]) * z
    if r.solver == 'stochastic':
        return stochastic_sample(denoiser, x, t_steps, generator=generator, **cond)
    return sample(denoiser, x, t_steps, r.solver, afs=r.afs, **cond)


def guided(denoiser, w, uncond=None):
    """Classifier-free guidance as a denoiser (Meng Sec. 2; Ho & Salimans 2022):
        D_w(x, t, c) = (1 + w) D(x, t, c) - w D_u(x, t)
    with Meng's w (w = 0 is the conditional model; SFD's omega = 1 + w). D_u is `uncond`, or the
    same network with a null label (zero one-hot). Two network calls per evaluation.
    """
    def D_w(x, t, class_labels=None, **cond):
        D_c = denoiser(x, t, class_labels=class_labels, **cond)
        null = None if class_labels is None else torch.zeros_like(class_labels)
        D_u = uncond(x, t, **cond) if uncond is not None else denoiser(x, t, class_labels=null, **cond)
        w_b = w.reshape(-1, *[1] * (x.ndim - 1)) if torch.is_tensor(w) else w  # w per sample or shared
        return (1 + w_b) * D_c - w_b * D_u
    return D_w


PRECISIONS = ('auto', 'fp32', 'bf16')


def autocast(device, precision='auto'):
    """The precision a denoiser runs in: 'auto' is bf16 autocast on CUDA and float32 elsewhere
    (EDMPrecond keeps its preconditioning in float32); 'fp32' and 'bf16' force one or the other."""
    if precision not in PRECISIONS:
        raise ValueError(f'unknown precision {precision!r}; choose one of {", ".join(PRECISIONS)}')
    kind = torch.device(device).type
    on = precision == 'bf16' or (precision == 'auto' and kind == 'cuda')
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=on)


# ---------------------------------------------------------------------------------------------
# Meng et al.'s stochastic N-step sampler
# ---------------------------------------------------------------------------------------------

def randn_like(x, generator=None):
    """Standard normal noise shaped like x, from one generator or one generator per sample."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device)
                            for g in generator])
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


@torch.no_grad()
def stochastic_sample(denoiser, x, t_steps, generator=None, trajectory=False, **cond):
    """Meng et al. Sec. 3.3, Eq. 4-7, in EDM form: N steps on the grid t_N > ... > t_1 > t_0.

    Meng writes z_t = alpha_t x + sigma_t eps; dividing by alpha gives our x = z / alpha with
    t = sigma / alpha, so a DDIM step (Eq. 2) becomes x_s = D + (t_s / t_k)(x_k - D), and the
    noise of Eq. 5/7, sigma_{a|b}^2 = (1 - e^{lambda_a - lambda_b}) sigma_a^2, becomes
    (t_a^2 - t_b^2) in x units. So from t_k (k >= 2) the sampler
        Eq. 4/6: steps deterministically two grid points down, x_{k-2} = D + (t_{k-2}/t_k)(x_k - D),
        Eq. 5/7: re-noises one point up, x_{k-1} = x_{k-2} + sqrt(t_{k-1}^2 - t_{k-2}^2) z,
    and at t_1 returns the denoised output D(x_1, t_1). N network calls in all.
    `generator` is a torch.Generator or one per sample (reproducible per image).
    """
    t = _times(t_steps)
    states = [x]
    for k in range(len(t) - 1, 0, -1):  # grid index k = N .. 1, t_k = t[N - k]
        t_k = t[len(t) - 1 - k]
        D = denoiser(x, torch.full((x.shape[0],), t_k, dtype=x.dtype, device=x.device), **cond)
        D = D.to(x.dtype)
        if k == 1:
            x = D  # the last step lands on the denoised output
        else:
            t_km1, t_km2 = t[len(t) - k], t[len(t) + 1 - k]
            x_km2 = D + (t_km2 / t_k) * (x - D)
            x = x_km2 + math.sqrt(t_km1 ** 2 - t_km2 ** 2) * randn_like(x, generator)
        states.append(x)
    return torch.stack(states) if trajectory else x


# ---------------------------------------------------------------------------------------------
# Closed-form denoisers: the exact reference for tests and notebooks
# ---------------------------------------------------------------------------------------------

def gaussian_denoiser(mu, s):
    """Posterior mean for data ~ N(mu, s^2 I): D(x, t) = (s^2 x + t^2 mu) / (s^2 + t^2)."""
    def D(x, t, **_):
        t2 = t.reshape(-1, *[1] * (x.ndim - 1)) ** 2
        return (s ** 2 * x + t2 * mu) / (s ** 2 + t2)
    return D


def gaussian_ode_solution(x_T, T, t, mu, s):
    """Exact PF-ODE solution of N(mu, s^2 I): x(t) = mu + (x_T - mu) sqrt((s^2 + t^2)/(s^2 + T^2))."""
    return mu + (x_T - mu) * math.sqrt((s ** 2 + t ** 2) / (s ** 2 + T ** 2))


if __name__ == '__main__':
    # Endpoint error of every solver on a Gaussian with a known solution, at a few NFE.
    torch.manual_seed(0)
    mu, s, t_min, t_max = 0.3, 0.5, 0.002, 80.
    x_T = t_max * torch.randn(1000, 2, dtype=torch.float64)
    exact = gaussian_ode_solution(x_T, t_max, t_min, mu, s)
    print(f'RMS endpoint error on N({mu}, {s}^2 I), polynomial schedule, t_min={t_min}')
    print('solver     ' + ''.join(f'{f"NFE {k}":>11}' for k in (4, 8, 16, 32)))
    for name in SOLVERS:
        errs = []
        for budget in (4, 8, 16, 32):
            n = steps_for_nfe(name, budget)
            out = sample(gaussian_denoiser(mu, s), x_T, time_schedule(n, t_min, t_max), name)
            errs.append((out - exact).pow(2).mean().sqrt().item())
        print(f'{name:<11}' + ''.join(f'{e:11.2e}' for e in errs))
