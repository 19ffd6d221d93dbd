"""Feature Gaussians of one scene (FiT3D stage I): parameters, rendering, densification and pruning.

A :class:`SceneGaussians` holds N 3D Gaussians with the 3DGS parameterisation (raw tensors, activated
on use): ``means [N,3]``, ``log_scales [N,3]`` (exp), ``quats [N,4]`` (wxyz, normalised by the
rasterizer), ``opacity_logits [N]`` (sigmoid), ``colors_dc [N,3]`` (view-independent colour as the
degree-0 spherical-harmonic coefficient, ``rgb = max(0.5 + C0 * dc, 0)`` as in 3DGS; higher SH degrees
are not modelled) and ``features [N,D]`` (FiT3D's low-dimensional feature, D = 64 by default). RGB and
features are rendered together by one :func:`bench.splat.rasterize` call (D + 3 channels, black
background, as FiT3D).

Adaptive density control follows 3DGS (Kerbl et al. 2023), simplified where noted:

* statistics per Gaussian between densifications: the running sum and count of the view-space
  positional gradient norm (in NDC units, like 3DGS/gsplat) and the largest screen radius. The
  rasterizer does not expose the gradient of the 2D means, so it is recovered from the gradient of
  the 3D means: ``dL/du = dL/dx_cam * z / fx`` (likewise v) -- exact for the mean's projection,
  ignoring the small path through the projected covariance;
* :meth:`densify_and_prune`: Gaussians whose mean gradient reaches the threshold are *cloned* when
  small (max scale <= ``percent_dense x extent``) or *split* into 2 samples drawn from them with scales
  / 1.6 when large; Gaussians with opacity below ``min_opacity`` -- and, once ``max_screen_size`` is
  given, those larger than that many pixels on screen or ``world_size x extent`` in the world -- are
  pruned (a pruned Gaussian is not densified in the same pass). Statistics restart afterwards;
* :meth:`reset_opacity`: opacities clamped to at most ``value`` (3DGS: 0.01).

Every change of N replaces the per-Gaussian ``nn.Parameter`` objects (autograd caches a leaf's shape)
and re-points the optimiser at the new ones, editing their Adam state (new entries start at zero,
removed ones are dropped), as 3DGS does. :meth:`load_state_dict` resizes to the saved N in place (no
graph exists yet), which makes checkpoints with a different Gaussian count resumable.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from bench.splat import rasterize
from bench.cameras import quat_to_rotmat
from bench.splat.project import project

C0 = 0.28209479177387814  # degree-0 SH basis constant: rgb = 0.5 + C0 * dc
PARAMS = ("means", "log_scales", "quats", "opacity_logits", "colors_dc", "features")
STATS = ("grad_accum", "grad_count", "max_radii")


def inverse_sigmoid(x: Tensor) -> Tensor:
    return torch.log(x / (1 - x))


def knn_mean_sq_dist(points: Tensor, k: int = 3, chunk: int = 512) -> Tensor:
    """Mean squared distance of every point to its ``k`` nearest other points ``[N]`` (chunked)."""
    out = []
    k = min(k, max(len(points) - 1, 1))
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i : i + chunk], points).pow_(2)
        d[torch.arange(d.shape[0]), torch.arange(i, i + d.shape[0])] = torch.inf  # not itself
        out.append(d.topk(k, dim=1, largest=False).values.mean(1))
    return torch.cat(out) if out else points.new_zeros(0)


class SceneGaussians(nn.Module):
    """N Gaussians with RGB and a D-dim feature; see the module docstring."""

    def __init__(self, n: int = 0, feature_dim: int = 64):
        super().__init__()
        self.feature_dim = int(feature_dim)
        shapes = self._shapes()
        for name in PARAMS:
            setattr(self, name, nn.Parameter(torch.zeros(n, *shapes[name])))
        for name in STATS:
            self.register_buffer(name, torch.zeros(n))

    def _shapes(self) -> Dict[str, tuple]:
        return {
            "means": (3,),
            "log_scales": (3,),
            "quats": (4,),
            "opacity_logits": (),
            "colors_dc": (3,),
            "features": (self.feature_dim,),
        }

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_points(
        cls, points: Tensor, colors: Tensor, feature_dim: int = 64, opacity: float = 0.1, knn: int = 3
    ) -> "SceneGaussians":
        """3DGS initialisation from a coloured point cloud: isotropic scale = sqrt of the mean squared
        distance to the ``knn`` nearest neighbours, identity rotation, opacity 0.1, colour from the
        points, features zero (FiT3D)."""
        g = cls(len(points), feature_dim).to(points.device)
        with torch.no_grad():
            g.means.copy_(points)
            g.log_scales.copy_(torch.log(knn_mean_sq_dist(points, knn).clamp_min(1e-7).sqrt())[:, None].expand(-1, 3))
            g.quats[:, 0] = 1.0
            g.opacity_logits.fill_(float(inverse_sigmoid(torch.tensor(opacity))))
            g.colors_dc.copy_((colors - 0.5) / C0)
        return g

    # ---- activated values --------------------------------------------------------------------------
    @property
    def num(self) -> int:
        return self.means.shape[0]

    @property
    def scales(self) -> Tensor:
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def rgb(self) -> Tensor:
        return (0.5 + C0 * self.colors_dc).clamp_min(0.0)

    def render(
        self, w2c: Tensor, K: Tensor, width: int, height: int, rgb: bool = True, features: bool = True
    ) -> Dict[str, Tensor]:
        """Render into C cameras: ``rgb [C,3,H,W]``, ``features [C,D,H,W]``, ``alpha [C,H,W]``,
        ``depth [C,H,W]`` (requested channels only, one rasterizer call)."""
        chans = ([self.rgb] if rgb else []) + ([self.features] if features else [])
        if not chans:
            raise ValueError("render: request rgb and/or features")
        img, alpha, depth = rasterize(
            self.means, self.quats, self.scales, self.opacities, torch.cat(chans, 1), w2c, K, int(width), int(height)
        )
        img = img.permute(0, 3, 1, 2)
        out = {"alpha": alpha, "depth": depth}
        if rgb:
            out["rgb"] = img[:, :3]
        if features:
            out["features"] = img[:, 3:] if rgb else img
        return out

    # ---- checkpoints with a changing N -------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        n = state_dict["means"].shape[0] if "means" in state_dict else self.num
        shapes = self._shapes()
        for name in PARAMS:
            p = getattr(self, name)
            p.data = p.data.new_zeros(n, *shapes[name])
            p.grad = None
        for name in STATS:
            setattr(self, name, getattr(self, name).new_zeros(n))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ---- editing N (parameters, statistics and the optimiser state together) -----------------------
    def _replace(self, name: str, data: Tensor, optimizer: Optional[torch.optim.Optimizer], moments) -> None:
        """Swap parameter ``name`` for a new ``nn.Parameter`` holding ``data`` (autograd caches a leaf's
        shape, so a resized leaf must be a new tensor), re-pointing the optimiser at it and mapping its
        Adam moments with ``moments``."""
        old, new = getattr(self, name), nn.Parameter(data)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [new if q is old else q for q in group["params"]]
            state = optimizer.state.pop(old, None)
            if state:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key] = moments(state[key])
                optimizer.state[new] = state
        setattr(self, name, new)

    def keep(self, mask: Tensor, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Keep only the Gaussians where ``mask [N]`` is True."""
        for name in PARAMS:
            self._replace(name, getattr(self, name).data[mask], optimizer, lambda t: t[mask])
        for name in STATS:
            setattr(self, name, getattr(self, name)[mask])

    def append(self, new: Mapping[str, Tensor], optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Append Gaussians given as raw parameters ``{name: [M,...]}`` (statistics and optimiser
        moments of the new ones start at zero)."""
        m = new["means"].shape[0]

        def pad(t: Tensor) -> Tensor:
            return torch.cat([t, t.new_zeros(m, *t.shape[1:])])

        for name in PARAMS:
            old = getattr(self, name).data
            self._replace(name, torch.cat([old, new[name].to(old)]), optimizer, pad)
        for name in STATS:
            setattr(self, name, pad(getattr(self, name)))

    def reset_opacity(self, value: float = 0.01, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Clamp opacities to at most ``value``; the opacity's Adam moments restart from zero (3DGS)."""
        with torch.no_grad():
            self.opacity_logits.data = torch.minimum(
                self.opacity_logits.data, inverse_sigmoid(torch.tensor(value)).to(self.opacity_logits)
            )
        state = optimizer.state.get(self.opacity_logits) if optimizer is not None else None
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = torch.zeros_like(state[key])

    # ---- adaptive density control ------------------------------------------------------------------
    @torch.no_grad()
    def view_stats(self, w2c: Tensor, K: Tensor, width: int, height: int) -> Dict[str, Tensor]:
        """Per-Gaussian visibility, screen radius and camera depth in one camera (before a step)."""
        proj = project(self.means, self.quats, self.scales, self.opacities, w2c[None], K[None], width, height)
        return {
            "visible": proj.valid[0],
            "radius": proj.radius[0].amax(-1),
            "z": proj.depth[0],
            "w2c": w2c,
            "K": K,
            "width": width,
            "height": height,
        }

    @torch.no_grad()
    def add_stats(self, view: Mapping[str, Tensor]) -> None:
        """Accumulate the view-space positional gradient norm (NDC units) of the visible Gaussians
        from ``self.means.grad`` (the gradient of the step rendered with ``view``)."""
        if self.means.grad is None:
            return
        vis = view["visible"]
        g_cam = self.means.grad @ view["w2c"][:3, :3].T
        K, z = view["K"], view["z"]
        gu = g_cam[:, 0] * z / K[0, 0] * (0.5 * view["width"])
        gv = g_cam[:, 1] * z / K[1, 1] * (0.5 * view["height"])
        norm = torch.sqrt(gu * gu + gv * gv)
        self.grad_accum += torch.where(vis, norm, 0)
        self.grad_count += vis.to(self.grad_count.dtype)
        self.max_radii.copy_(torch.where(vis, torch.maximum(self.max_radii, view["radius"]), self.max_radii))

    @torch.no_grad()
    def densify_and_prune(
        self,
        optimizer: Optional[torch.optim.Optimizer],
        *,
        grad_threshold: float,
        extent: float,
        percent_dense: float = 0.01,
        min_opacity: float = 0.005,
        max_screen_size: Optional[float] = None,
        world_size: float = 0.1,
        max_gaussians: Optional[int] = None,
        split_n: int = 2,
    ) -> Dict[str, int]:
        """Clone / split / prune (module docstring). Returns the counts and the new N."""
        n = self.num
        grads = torch.where(self.grad_count > 0, self.grad_accum / self.grad_count.clamp_min(1), 0)
        size = self.scales.max(1).values
        prune = self.opacities < min_opacity
        if max_screen_size is not None:
            prune |= (self.max_radii > max_screen_size) | (size > world_size * extent)
        hot = (grads >= grad_threshold) & ~prune
        big = size > percent_dense * extent
        if max_gaussians is not None:  # growth budget: the largest gradients first
            budget = max(int(max_gaussians) - int((~prune).sum()), 0)
            cost = torch.where(big, split_n - 1, 1)
            order = torch.argsort(torch.where(hot, grads, -1.0), descending=True)
            ok = (torch.cumsum(cost[order] * hot[order], 0) <= budget) & hot[order]
            hot = torch.zeros_like(hot).scatter_(0, order, ok)
        clone, split = hot & ~big, hot & big

        raw = {name: getattr(self, name).data for name in PARAMS}
        new = {k: v[clone] for k, v in raw.items()}
        if split.any():
            s = self.scales[split].repeat(split_n, 1)
            R = quat_to_rotmat(raw["quats"][split]).repeat(split_n, 1, 1)
            offsets = (R @ (torch.randn_like(s) * s)[..., None])[..., 0]
            children = {k: v[split].repeat(split_n, *([1] * (v.dim() - 1))) for k, v in raw.items()}
            children["means"] = children["means"] + offsets
            children["log_scales"] = torch.log(s / (0.8 * split_n))
            new = {k: torch.cat([new[k], children[k]]) for k in raw}
        self.append(new, optimizer)
        remove = torch.cat([split | prune, prune.new_zeros(self.num - n)])
        self.keep(~remove, optimizer)
        for name in STATS:
            getattr(self, name).zero_()
        return {"cloned": int(clone.sum()), "split": int(split.sum()), "pruned": int(prune.sum()), "num": self.num}
