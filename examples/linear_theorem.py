"""Theorem 1 of DSD, reproduced numerically: distilling a noisy linear teacher denoises.

Data x = E z (E in R^{d x r}, orthonormal columns, z ~ N(0, I_r)); observations y = x + sigma eps. The
teacher score at level sigma_t is known exactly, s(x_t) = -(E E^T + (sigma^2 + sigma_t^2) I)^{-1} x_t.
The generator G(z) = U V^T z (z ~ N(0, I_d)) gives p_G^{sigma_t} = N(0, U V^T V U^T + sigma_t^2 I).

Loss (Eq. 4): E_t E_{x_t ~ p_G^{sigma_t}} ||s(x_t) - grad log p_G^{sigma_t}(x_t)||^2. Both scores are linear,
s = -S1 x, grad log p_G = -S2 x, so the inner expectation is exactly tr((S1 - S2)^T (S1 - S2) C) with C the
covariance of x_t under p_G; E_t is a midpoint rule over t in (0, 1) with sigma_t log-uniform in
[sigma_min, sigma_max]. The theorem's minimiser does not depend on that schedule (every t has the same
minimiser), so the grid introduces no bias. Only p_G is identified: U = E Q, V^T V = (1 + sigma^2) I_r.

`--loss sid` instead trains with the Monte Carlo SiD generator loss (alpha = 0.5) with the exact teacher and
fake denoisers, f(x_t) = x_t + sigma_t^2 score(x_t), gradients flowing through x_g and x_t only. Weighted by
2 / sigma_t^4, its expected gradient is the gradient of Eq. (4), so it shares the minimiser.

Constraint U^T U = I_r (the theorem's family Theta): U = qr(W).Q, W unconstrained, so Adam runs on the
Stiefel manifold without retraction steps. V is unconstrained; V^T V > 0 holds for a random init and V^T V
singular is never a minimiser (the loss decreases in every eigenvalue of V^T V at zero). Adam with a cosine
lr decay reaches the minimiser from a random init; the other critical points seen are saddles (a column of
U outside range(E), its eigenvalue of V^T V = sigma^2), which slow down runs whose init is nearly
orthogonal to E, mostly in the Monte Carlo mode with a small lr.

Expected (Eq. 5): singular values of E^T U -> 1, eig(V^T V) -> 1 + sigma^2, and
W2^2(p_G, p_X) = W2^2(p_Y, p_X) - (d - r) sigma^2 = r (sqrt(1 + sigma^2) - 1)^2.

    python examples/linear_theorem.py --d 32 --r 4 --sigma 0.5
"""

import argparse
import json
import math
import time

import torch


def teacher_precision(E, sigma, sigma_t):
    """S1[k] = (E E^T + (sigma^2 + sigma_t[k]^2) I)^{-1}, the negated noisy teacher score, [K, d, d]."""
    d = E.shape[0]
    eye = torch.eye(d, dtype=E.dtype, device=E.device)
    return torch.linalg.inv(E @ E.T + (sigma**2 + sigma_t[:, None, None] ** 2) * eye)


def generator_factor(U, V):
    """F (d x r) with F F^T = U V^T V U^T, the covariance of p_G = (U V^T)_# N(0, I_d): F = U R^T, V = Q R."""
    return U @ torch.linalg.qr(V).R.mT


def fisher_loss(U, V, S1, sigma_t):
    """Eq. (4) in closed form, O(K d^2 r): mean_k tr((S1 - S2)^T (S1 - S2) C).

    C = F F^T + sigma_t^2 I is x_t's covariance under p_G and S2 = C^{-1}. As S1, C are symmetric and S2 C = I,
    tr((S1 - S2)^2 C) = ||S1 F||_F^2 + sigma_t^2 tr(S1^2) - 2 tr(S1) + tr(C^{-1}), and F F^T has the
    eigenvalues of F^T F plus d - r zeros: tr(C^{-1}) = (d - r) / sigma_t^2 + tr((F^T F + sigma_t^2 I_r)^{-1}).
    """
    d, r = U.shape
    F = generator_factor(U, V)
    s2 = sigma_t**2
    eye_r = torch.eye(r, dtype=U.dtype, device=U.device)
    chol = torch.linalg.cholesky(F.T @ F + s2[:, None, None] * eye_r)
    tr_C_inv = (d - r) / s2 + (torch.linalg.solve_triangular(chol, eye_r, upper=False) ** 2).sum(dim=(1, 2))
    tr = ((S1 @ F) ** 2).sum(dim=(1, 2)) + s2 * (S1**2).sum(dim=(1, 2)) - 2 * S1.diagonal(dim1=1, dim2=2).sum(1)
    return (tr + tr_C_inv).mean()


def fisher_loss_dense(U, V, S1, sigma_t):
    """Eq. (4) as the literal d x d trace tr((S1 - S2)^T (S1 - S2) C), to check fisher_loss against."""
    d = U.shape[0]
    F = generator_factor(U, V)
    C = F @ F.T + sigma_t[:, None, None] ** 2 * torch.eye(d, dtype=U.dtype, device=U.device)
    D = S1 - torch.linalg.inv(C)
    return (D.mT @ D @ C).diagonal(dim1=1, dim2=2).sum(1).mean()


def sid_loss(U, V, S1, sigma_t, batch, gen=None, alpha=0.5):
    """SiD generator loss with exact teacher (f_phi) and fake (f_psi, theta frozen) denoisers, Monte Carlo.

    L = (1 - alpha) ||f_phi - f_psi||^2 + (f_phi - f_psi)^T (f_psi - x_g) with x_t = x_g + sigma_t eps and
    f(x_t) = x_t - sigma_t^2 S x_t; batch // K samples per sigma_t; gradients reach theta through x_g and x_t.
    For alpha = 0.5 the expected gradient of L is sigma_t^4 / 2 times that of Eq. (4), so L is weighted by
    2 / sigma_t^4 and shares fisher_loss's minimiser. For SiD's practical alpha (1.0 to 1.2) the expected
    gradient does not vanish at the theorem's minimiser.
    """
    d = U.shape[0]
    n = max(1, batch // sigma_t.shape[0])
    s_t = sigma_t[:, None, None]
    z, eps = torch.randn(2, sigma_t.shape[0], n, d, generator=gen, dtype=U.dtype, device=U.device)
    x_g = z @ (U @ V.T).T
    x_t = x_g + s_t * eps
    with torch.no_grad():
        F = generator_factor(U, V)
        S2 = torch.linalg.inv(F @ F.T + s_t**2 * torch.eye(d, dtype=U.dtype, device=U.device))
    f_phi = x_t - s_t**2 * x_t @ S1  # S symmetric: row x S = (S x)^T
    f_psi = x_t - s_t**2 * x_t @ S2
    diff = f_phi - f_psi
    L = (1 - alpha) * (diff * diff).sum(-1) + (diff * (f_psi - x_g)).sum(-1)
    return (2 * L / s_t[:, :, 0] ** 4).mean()


def sqrtm_psd(S):
    """Symmetric PSD square root via eigh. Eigenvalues below the rounding level d eps |S| are zeroed: for the
    degenerate covariances here (rank r < d) their square roots would add O(sqrt(eps)) noise to W2."""
    lam, Q = torch.linalg.eigh(S)
    tol = S.shape[-1] * torch.finfo(S.dtype).eps * lam.abs().max()
    return (Q * torch.where(lam > tol, lam, 0).sqrt()) @ Q.T


def w2_gaussian(S1, S2):
    """W2^2(N(0, S1), N(0, S2)) = tr S1 + tr S2 - 2 tr (S2^1/2 S1 S2^1/2)^1/2 (Bures; degenerate S allowed)."""
    R = sqrtm_psd(S2)
    M = R @ S1 @ R
    return (S1.trace() + S2.trace() - 2 * sqrtm_psd((M + M.T) / 2).trace()).item()


def stiefel(W):
    """U = qr(W).Q, the point of the Stiefel manifold {U^T U = I_r} that parametrises W."""
    return torch.linalg.qr(W).Q


def run(d=32, r=4, sigma=0.5, steps=400, lr=0.1, batch=4096, seed=None, device="cpu",
        sigma_min=0.1, sigma_max=10.0, n_t=16, loss="fisher"):
    """Minimise Eq. (4) over Theta with Adam (fp64) from a random init; return the Theorem 1 quantities."""
    if not 0 < r < d:
        raise ValueError(f"r: expected 0 < r < d, got r={r}, d={d}")
    if not sigma > 0:
        raise ValueError(f"sigma: expected > 0, got {sigma}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if steps < 1 or n_t < 1 or batch < 1:
        raise ValueError(f"steps, n_t, batch: expected >= 1, got {steps}, {n_t}, {batch}")
    if loss not in ("fisher", "sid"):
        raise ValueError(f"loss: expected 'fisher' or 'sid', got {loss!r}")
    t0 = time.perf_counter()
    dev = torch.device(device)
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    gen_mc = torch.Generator(device=dev)  # Monte Carlo noise of --loss sid, drawn on the device
    gen_mc.manual_seed(int(torch.randint(2**62, (), generator=gen)))
    f64 = dict(dtype=torch.float64, device=dev)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dev)

    E = stiefel(randn(d, r))
    t = (torch.arange(n_t, **f64) + 0.5) / n_t
    sigma_t = sigma_min ** (1 - t) * sigma_max**t
    S1 = teacher_precision(E, sigma, sigma_t)

    W = randn(d, r).requires_grad_()
    V = (randn(d, r) / math.sqrt(d)).requires_grad_()  # V^T V ~ I_r, away from the target (1 + sigma^2) I_r
    opt = torch.optim.Adam([W, V], lr=lr)
    # Cosine decay to lr/1000: with a constant lr, Adam hovers at O(lr) around the optimum.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * k / steps)))
    with torch.no_grad():
        sv0 = torch.linalg.svdvals(E.T @ stiefel(W))
    for _ in range(steps):
        U = stiefel(W)
        L = fisher_loss(U, V, S1, sigma_t) if loss == "fisher" else sid_loss(U, V, S1, sigma_t, batch, gen_mc)
        opt.zero_grad(set_to_none=True)
        L.backward()
        opt.step()
        sched.step()

    with torch.no_grad():
        U = stiefel(W)
        eye = torch.eye(d, **f64)
        sv = torch.linalg.svdvals(E.T @ U)
        eig = torch.linalg.eigvalsh(V.T @ V)
        P_X = E @ E.T
        F = generator_factor(U, V)
        w2_gx = w2_gaussian(F @ F.T, P_X)
        w2_yx = w2_gaussian(P_X + sigma**2 * eye, P_X)
        V_star = math.sqrt(1 + sigma**2) * E  # any V with V^T V = (1 + sigma^2) I_r
        return {
            "d": d, "r": r, "sigma": sigma, "steps": steps, "loss_kind": loss,
            "loss": fisher_loss(U, V, S1, sigma_t).item(),
            "loss_dense": fisher_loss_dense(U, V, S1, sigma_t).item(),
            "loss_at_theorem_minimiser": fisher_loss(E, V_star, S1, sigma_t).item(),
            "sv_EtU_init": sv0.tolist(),
            "sv_EtU": sv.tolist(),
            "alignment": (sv**2).sum().item() / r,  # ||E^T U||_F^2 / r
            "max_principal_angle_deg": math.degrees(math.acos(min(1.0, sv.min().item()))),
            "eig_VtV": eig.tolist(),
            "eig_target": 1 + sigma**2,
            "w2_G_X": w2_gx,
            "w2_Y_X": w2_yx,
            "w2_Y_X_minus": w2_yx - (d - r) * sigma**2,
            "w2_theorem": r * (math.sqrt(1 + sigma**2) - 1) ** 2,
            "seconds": time.perf_counter() - t0,
        }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=32, help="ambient dimension")
    p.add_argument("--r", type=int, default=4, help="data rank (0 < r < d)")
    p.add_argument("--sigma", type=float, default=0.5, help="observation noise std")
    p.add_argument("--steps", type=int, default=400, help="Adam steps")
    p.add_argument("--lr", type=float, default=0.1, help="Adam peak learning rate (cosine decay)")
    p.add_argument("--batch", type=int, default=4096, help="Monte Carlo batch (--loss sid only)")
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: fresh)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sigma-min", type=float, default=0.1)
    p.add_argument("--sigma-max", type=float, default=10.0)
    p.add_argument("--n-t", type=int, default=16, help="number of sigma_t grid points")
    p.add_argument("--loss", choices=["fisher", "sid"], default="fisher")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the report")
    a = p.parse_args()
    if torch.device(a.device).type == "cpu":
        torch.set_num_threads(1)  # d x d matrices: threading costs more than it saves
    res = run(a.d, a.r, a.sigma, a.steps, a.lr, a.batch, a.seed, a.device, a.sigma_min, a.sigma_max, a.n_t,
              a.loss)
    if a.json:
        print(json.dumps(res))
        return
    fmt = lambda xs: " ".join(f"{x:.6f}" for x in xs)
    print(f"d={a.d} r={a.r} sigma={a.sigma} loss={a.loss} steps={a.steps} ({res['seconds']:.2f} s)")
    print(f"Fisher loss {res['loss']:.10f} (theorem minimiser {res['loss_at_theorem_minimiser']:.10f})")
    print(f"U vs E: singular values of E^T U {fmt(res['sv_EtU'])} (init {fmt(res['sv_EtU_init'])}), "
          f"||E^T U||_F^2/r = {res['alignment']:.8f}, max principal angle {res['max_principal_angle_deg']:.2e} deg")
    eig_err = max(abs(e / res["eig_target"] - 1) for e in res["eig_VtV"])
    print(f"eig(V^T V) {fmt(res['eig_VtV'])} vs 1 + sigma^2 = {res['eig_target']:.6f} (max rel. err {eig_err:.1e})")
    print(f"W2^2(p_G, p_X) = {res['w2_G_X']:.6f} vs W2^2(p_Y, p_X) - (d - r) sigma^2 = "
          f"{res['w2_Y_X']:.6f} - {(a.d - a.r) * a.sigma**2:.6f} = {res['w2_Y_X_minus']:.6f} "
          f"(closed form r (sqrt(1 + sigma^2) - 1)^2 = {res['w2_theorem']:.6f}; "
          f"rel. err {abs(res['w2_G_X'] / res['w2_Y_X_minus'] - 1):.1e})")


if __name__ == "__main__":
    main()
