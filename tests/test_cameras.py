"""Camera conventions: +0.5 pixel centres, OpenCV w2c, GL<->CV, quaternions, correspondences."""

import math

import pytest
import torch

from bench.cameras import (
    crop_intrinsics,
    dense_correspondence,
    look_at,
    opencv_w2c_to_opengl_c2w,
    opengl_c2w_to_opencv_w2c,
    pixel_grid,
    project_points,
    quat_to_rotmat,
    relative_rotation_deg,
    rotmat_to_quat,
    sample_depth,
    scale_intrinsics,
    unproject_depth,
)

D = torch.float64


def _K(f=100.0, cx=50.0, cy=40.0, fy=None):
    return torch.tensor([[f, 0, cx], [0, fy or f, cy], [0, 0, 1]], dtype=D)


def _random_w2c(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    eye = torch.rand(n, 3, generator=g, dtype=D) * 4 - 2
    target = torch.rand(n, 3, generator=g, dtype=D) * 0.5 + torch.tensor([0.0, 0.0, 5.0], dtype=D)
    return look_at(eye, target)


def test_pixel_grid_centres():
    g = pixel_grid(3, 4)
    assert g.shape == (3, 4, 2)
    assert g[0, 0].tolist() == [0.5, 0.5]
    assert g[2, 3].tolist() == [3.5, 2.5]  # (u, v) = (col + 0.5, row + 0.5)


def test_unproject_hand_computed():
    depth = torch.full((80, 100), 2.0, dtype=D)
    pts = unproject_depth(depth, _K())
    # pixel (row 40, col 50) has centre (50.5, 40.5): x = 0.5 / 100 * 2, y = 0.5 / 100 * 2
    assert torch.allclose(pts[40, 50], torch.tensor([0.01, 0.01, 2.0], dtype=D))
    assert torch.allclose(pts[0, 0], torch.tensor([(0.5 - 50) / 50, (0.5 - 40) / 50, 2.0], dtype=D))


def test_project_unproject_identity_batched():
    B, H, W = 3, 12, 16
    K = torch.stack([_K(20, 8, 6), _K(25, 7.5, 6.5, fy=27), _K(18, 8.2, 5.9)])
    w2c = _random_w2c(B)
    depth = torch.rand(B, H, W, dtype=D) * 3 + 0.5
    pts = unproject_depth(depth, K, w2c)
    assert pts.shape == (B, H, W, 3)
    uv, z = project_points(pts, K, w2c)
    assert torch.allclose(uv, pixel_grid(H, W, dtype=D).expand(B, H, W, 2), atol=1e-9)
    assert torch.allclose(z, depth, atol=1e-12)
    # camera frame (no w2c) too
    uv, z = project_points(unproject_depth(depth, K), K)
    assert torch.allclose(uv, pixel_grid(H, W, dtype=D).expand(B, H, W, 2), atol=1e-9)


def test_project_is_differentiable():
    pts = torch.tensor([[0.1, -0.2, 2.0]], dtype=D, requires_grad=True)
    uv, _ = project_points(pts, _K())
    uv.sum().backward()
    # d(u)/dx = f / z = 50, d(v)/dy = 50, d(u+v)/dz = -f (x + y) / z^2 = -100 * (-0.1) / 4
    assert torch.allclose(pts.grad, torch.tensor([[50.0, 50.0, 2.5]], dtype=D))


def test_opengl_opencv_conversion():
    c2w_gl = torch.eye(4, dtype=D)  # GL camera at origin looking down -z
    w2c = opengl_c2w_to_opencv_w2c(c2w_gl)
    assert torch.equal(w2c, torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=D)))
    uv, z = project_points(torch.tensor([[0.0, 1.0, -2.0]], dtype=D), _K(), w2c)
    assert z.item() == 2.0 and uv[0, 1].item() < 40  # in front; world up is image up
    w2c = _random_w2c(5, seed=1)
    assert torch.allclose(opengl_c2w_to_opencv_w2c(opencv_w2c_to_opengl_c2w(w2c)), w2c, atol=1e-12)


def test_quaternions():
    s = math.sqrt(0.5)
    R = quat_to_rotmat(torch.tensor([s, 0, 0, s], dtype=D))  # 90 deg about z
    assert torch.allclose(R, torch.tensor([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=D), atol=1e-12)
    q = torch.randn(64, 4, dtype=D, generator=torch.Generator().manual_seed(0))
    q = q / q.norm(dim=-1, keepdim=True)
    q = torch.where(q[:, :1] < 0, -q, q)
    R = quat_to_rotmat(q)
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=D).expand(64, 3, 3), atol=1e-12)
    assert torch.allclose(rotmat_to_quat(R), q, atol=1e-9)
    assert torch.allclose(rotmat_to_quat(quat_to_rotmat(-q)), q, atol=1e-9)  # sign canonical (w >= 0)


def test_look_at_axes():
    w2c = look_at(torch.tensor([0.0, 0.0, 1.0], dtype=D), torch.tensor([4.0, 0.0, 1.0], dtype=D))
    K = _K()
    uv, z = project_points(torch.tensor([[4.0, 0.0, 1.0], [4.0, 0.0, 2.0], [4.0, -1.0, 1.0]], dtype=D), K, w2c)
    assert torch.allclose(uv[0], torch.tensor([50.0, 40.0], dtype=D))  # target -> principal point
    assert uv[1, 1] < 40 and abs(uv[1, 0] - 50) < 1e-9  # world up -> image up
    assert uv[2, 0] > 50  # world -y is to the right
    assert torch.allclose(z, torch.full((3,), 4.0, dtype=D))
    with pytest.raises(ValueError):
        look_at(torch.zeros(3), torch.tensor([0.0, 0.0, 1.0]))


def test_scale_and_crop_intrinsics():
    K = _K(100, 50, 40)
    pts = torch.tensor([[0.3, -0.2, 2.5], [-1.0, 0.4, 3.0]], dtype=D)
    uv, _ = project_points(pts, K)
    uv2, _ = project_points(pts, scale_intrinsics(K, 2.0, 0.5))
    assert torch.allclose(uv2, uv * torch.tensor([2.0, 0.5], dtype=D))
    # pixel centres of a 2x-downsampled image sit at the centres of 2x2 blocks of the original
    Ks = scale_intrinsics(K, 0.5, 0.5)
    p = unproject_depth(torch.ones(1, 1, dtype=D), Ks)[0, 0]  # small pixel (0, 0)
    uv_big, _ = project_points(p[None], K)
    assert torch.allclose(uv_big, torch.tensor([[1.0, 1.0]], dtype=D))  # corner of pixels 0..1
    uvc, _ = project_points(pts, crop_intrinsics(K, 10, 5))
    assert torch.allclose(uvc, uv - torch.tensor([10.0, 5.0], dtype=D))


def test_relative_rotation():
    a = torch.eye(4, dtype=D)
    b = torch.eye(4, dtype=D)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    b[:3, :3] = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=D)
    assert relative_rotation_deg(a, b).item() == pytest.approx(30.0)


def _plane_depth(K, H, W, height=1.5):
    """Z-depth of a floor 1.5 m below the camera (OpenCV y down): z = height / y_n; sky = 0."""
    g = pixel_grid(H, W, dtype=D)
    yn = (g[..., 1] - K[1, 2]) / K[1, 1]
    return torch.where(yn > 1e-3, height / yn.clamp_min(1e-3), torch.zeros_like(yn))


def _translate(x=0.0, y=0.0, z=0.0):
    T = torch.eye(4, dtype=D)
    T[:3, 3] = -torch.tensor([x, y, z], dtype=D)  # camera centre at (x, y, z), no rotation
    return T


def test_dense_correspondence_fronto_parallel_and_occlusion():
    H, W = 40, 60
    K = _K(50, 30, 20)
    wall = torch.full((H, W), 4.0, dtype=D)
    a, b = _translate(), _translate(x=0.4)
    uv, valid = dense_correspondence(wall, K, a, wall, K, b)
    shift = 50 * 0.4 / 4.0  # f * baseline / depth = 5 px
    g = pixel_grid(H, W, dtype=D)
    assert torch.allclose(uv, g - torch.tensor([shift, 0.0], dtype=D))
    assert torch.equal(valid, g[..., 0] - shift >= 0)  # exactly the pixels that stay in the image
    # an occluder in front of the wall in view b (moved by 5.375 px: sub-pixel positions) hides
    # what lies behind it, plus the pixels whose inverse-depth interpolation touches its silhouette
    b = _translate(x=0.43)
    uv, valid = dense_correspondence(wall, K, a, wall, K, b)
    occl = wall.clone()
    occl[10:20, 20:30] = 2.0
    _, valid_o = dense_correspondence(wall, K, a, occl, K, b)
    x, row = uv[..., 0] - 0.5, (uv[..., 1] - 0.5).round()
    c0 = x.floor()
    c1 = torch.where(x > c0, c0 + 1, c0)
    touched = (row >= 10) & (row < 20) & (((c0 >= 20) & (c0 < 30)) | ((c1 >= 20) & (c1 < 30)))
    behind = (uv[..., 0] >= 20) & (uv[..., 0] < 30) & (uv[..., 1] >= 10) & (uv[..., 1] < 20)
    assert (valid & behind).sum() > 50 and (valid & touched & ~behind).sum() > 5
    assert torch.equal(valid_o, valid & ~touched)
    # the same view maps onto itself, and invalid depth is never valid
    uv, valid = dense_correspondence(wall, K, a, wall, K, a)
    assert valid.all() and torch.allclose(uv, g)
    wall0 = wall.clone()
    wall0[0] = 0
    assert not dense_correspondence(wall0, K, a, wall, K, a)[1][0].any()


def test_dense_correspondence_grazing_floor_batched():
    """A floor seen at grazing angles: nearest-pixel depth is off by >1% far away, the inverse-depth
    bilinear sample is exact on planes, so every floor point that lands in view b stays valid."""
    H, W = 48, 64
    K = _K(40, 32, 24)
    da = _plane_depth(K, H, W)
    b = _translate(x=0.23, z=0.37)
    db = _plane_depth(K, H, W)  # camera moved parallel to the floor
    uv, valid = dense_correspondence(
        da[None].expand(2, H, W),
        K.expand(2, 3, 3),
        _translate().expand(2, 4, 4),
        db[None].expand(2, H, W),
        K.expand(2, 3, 3),
        b.expand(2, 4, 4),
    )
    assert valid.shape == (2, H, W) and torch.equal(valid[0], valid[1])
    inb = (da > 0) & (uv[0, ..., 0] >= 0) & (uv[0, ..., 0] < W) & (uv[0, ..., 1] >= 0) & (uv[0, ..., 1] < H)
    inb &= (
        db.reshape(-1)[
            (uv[0, ..., 1].floor().clamp(0, H - 1) * W + uv[0, ..., 0].floor().clamp(0, W - 1)).long()
        ].reshape(H, W)
        > 0
    )  # lands on floor pixels of b
    near, bil = sample_depth(db[None], uv[0][inb][None])
    assert inb.sum() > 300 and (bil > 0).float().mean() > 0.9  # (bilinear needs 4 floor neighbours)
    assert torch.equal(valid[0][inb], bil[0] > 0) and not valid[0][~inb].any()
    z = 1.5 / ((uv[0][inb][:, 1] - 24) / 40)  # exact depth of the floor in b at uv
    assert torch.allclose(bil[0][bil[0] > 0], z[bil[0] > 0], rtol=1e-9)
    assert ((near[0] - z).abs() / z).max() > 0.01  # nearest alone would reject far floor pixels
