"""Procedural indoor scenes, rendered by exact ray casting, written in the ScanNet++ DSLR layout.

Each scene is a closed box room (4 walls, floor, ceiling) furnished with boxes, spheres, cylinders,
wall paintings and a rug of random size and pose, textured with procedural patterns evaluated in
each object's own frame (so textures are multi-view consistent) and lit by an ambient term plus two
point lights with Lambertian shading (no shadows, no specular: a surface looks the same from every
view, shading reveals its orientation). A smooth camera path (an arc of an ellipse around the room
centre, looking at the centre with smooth jitter) views the room; consecutive views overlap strongly.

Rendering is analytic (ray-plane / ray-box / ray-sphere / ray-cylinder), vectorised in torch. Depth,
normals and labels are exact at pixel centres (+0.5 convention); RGB is optionally supersampled
(``supersample`` x ``supersample`` sub-pixel rays, averaged) for anti-aliasing.

Semantic classes (``CLASSES``; index = label value, 255 = ignore, never produced here)::

    0 wall   1 floor   2 ceiling   3 box   4 sphere   5 cylinder   6 painting   7 rug

Instance ids: 1..4 the walls, 5 floor, 6 ceiling, 7.. the objects (0 = none, never produced here).

On-disk layout (ScanNet++ DSLR, as produced by its undistortion + depth rendering; read back by
:class:`bench.data.scenes.MultiViewScenes`)::

    <root>/meta.json                           set parameters (generator, version, scenes, views,
                                               size, seed, supersample, hfov_deg, classes, scene_ids)
    <root>/<scene>/meta.json                   the scene: room, objects, lights, textures, path, seed
    <root>/<scene>/dslr/nerfstudio/transforms_undistorted.json
                                               nerfstudio: camera_model PINHOLE, fl_x, fl_y, cx, cy,
                                               w, h, frames[{file_path, transform_matrix}], where
                                               transform_matrix = camera-to-world in OpenGL axes
    <root>/<scene>/dslr/undistorted_images/frame_XXXX.png     RGB uint8 (lossless PNG, not JPG)
    <root>/<scene>/dslr/render_depth/frame_XXXX.png           z-depth, uint16 millimetres, 0 invalid
    <root>/<scene>/dslr/render_normal_camera/frame_XXXX.npz   np.load(...)["normals"]: float16 [H,W,3]
                                                              unit normals, camera frame (OpenCV
                                                              axes), facing the camera
    <root>/<scene>/dslr/render_semantic/frame_XXXX.png        uint8 class labels (table above)
    <root>/<scene>/dslr/render_instance/frame_XXXX.png        uint16 instance ids

Deterministic: scene ``i`` of seed ``s`` depends only on ``(s, i)``; the same call writes
byte-identical files.

Modules: :mod:`.spec` (constants, scene sampling, camera path), :mod:`.raycast` (ray caster and
shading), :mod:`.writer` (files of one scene, the worker pool, reuse and splits), :mod:`.cli`
(``python -m bench data synthetic`` and the registry entry). Every name is re-exported here.
"""

from .spec import (
    CLASSES,
    DEPTH,
    DSLR,
    GENERATOR,
    IMAGES,
    INSTANCE,
    NORMALS,
    SEMANTIC,
    TRANSFORMS,
    VERSION,
    camera_path,
    default_root,
    intrinsics,
    make_scene,
)
from .raycast import Primitives, cast_rays, render_view
from .writer import default_workers, ensure_synthetic, generate, generate_scene, holds_set, split_scenes
from .cli import SyntheticData, add_arguments, cli

__all__ = [
    "CLASSES",
    "GENERATOR",
    "VERSION",
    "make_scene",
    "camera_path",
    "intrinsics",
    "render_view",
    "cast_rays",
    "Primitives",
    "generate",
    "generate_scene",
    "ensure_synthetic",
    "holds_set",
    "split_scenes",
    "default_root",
    "DSLR",
    "TRANSFORMS",
    "IMAGES",
    "DEPTH",
    "NORMALS",
    "SEMANTIC",
    "INSTANCE",
    "SyntheticData",
    "add_arguments",
    "cli",
    "default_workers",
]
