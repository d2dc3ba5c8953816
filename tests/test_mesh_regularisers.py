"""The mesh regularisers `edge` and `normal` and the template graph they read (models/mesh_graph.py).

Known answers: edge is 0 for the truth and any rigid copy of it, and |s - 1| * (mean true edge length) for
the truth scaled by s about the root; normal is 0 for the truth and a translated copy, and
(|sin t| + |sin t| / sqrt 2) / 3 for a right isosceles triangle turned by t about one leg. The graph is
symmetric, loop-free, covers every vertex, finds every triangle once, and comes out the same every time.
"""
import itertools
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cliphand3d.build import build_criterion, compose_config
from cliphand3d.data.synthetic import SyntheticHands
from cliphand3d.data.transforms import CropAugment, batch_to_device
from cliphand3d.errors import ConfigError
from cliphand3d.geometry import points_to_uvd, rotation_z
from cliphand3d.losses import CLIPHand3DLoss, edge_length_error, normal_error
from cliphand3d.models.cliphand3d import CLIPHand3D
from cliphand3d.models.mesh_graph import build_mesh_graph, knn_edges, skeleton_points
from cliphand3d.models.template import build_template
from cliphand3d.models.training import TrainingModule

IMG = 64
MESH = {"edge": 1.0, "normal": 0.1}


@pytest.fixture(scope="module")
def data():
    ds = SyntheticHands(length=8, seed=3, img_size=IMG, num_verts=200, augment=CropAugment())
    xyz, verts = ds.all_labels()
    items = [ds[i] for i in range(4)]
    hands = {k: torch.stack([it[k] for it in items]).double()
             for k in ("joints_xyz", "verts_xyz", "K", "root_depth", "bone")}
    return hands, build_template(verts, xyz, levels=(40, 80, 120))


def batch_for(h):
    uvd = lambda xyz: points_to_uvd(xyz, h["K"], IMG, h["root_depth"], h["bone"]).float()  # noqa: E731
    return {"image": torch.zeros(len(h["K"]), 3, IMG, IMG), "K": h["K"].float(), "root_depth": h["root_depth"].float(),
            "bone": h["bone"].float(), "joints_uvd": uvd(h["joints_xyz"]), "verts_uvd": uvd(h["verts_xyz"])}


def outputs_for(h, verts_xyz):
    uvd = lambda xyz: points_to_uvd(xyz, h["K"], IMG, h["root_depth"], h["bone"]).float()  # noqa: E731
    return {"joints_coarse": uvd(h["joints_xyz"]), "joints": uvd(h["joints_xyz"]), "verts": uvd(verts_xyz)}


# --------------------------------------------------------------------------- the graph
def test_the_graph_is_symmetric_loop_free_covering_and_deterministic(data):
    _, template = data
    g = template.mesh_graph(5)
    n = template.num_verts
    e = g.edges
    assert e.dtype == np.int64 and (e[:, 0] < e[:, 1]).all()  # no self loops, each edge once as (low, high)
    assert len(np.unique(e, axis=0)) == len(e)
    adj = np.zeros((n, n), bool)
    adj[e[:, 0], e[:, 1]] = adj[e[:, 1], e[:, 0]] = True
    # symmetrised kNN: each vertex is joined to all 5 of its nearest, and to whoever lists it
    d2 = ((template.verts[:, None] - template.verts[None]) ** 2).sum(-1) + np.diag(np.full(n, np.inf))
    nearest = np.argsort(d2, axis=1, kind="stable")[:, :5]
    assert adj[np.arange(n)[:, None], nearest].all()
    assert adj.sum(1).min() >= 5
    again = template.mesh_graph(5)
    assert np.array_equal(again.edges, g.edges) and np.array_equal(again.triangles, g.triangles)
    assert set(template.to_dict()) == {"verts", "joints", "J", "levels_flat", "level_sizes"}  # nothing stored


def test_every_triangle_of_mutual_neighbours_is_found_once():
    pts = np.random.default_rng(0).normal(size=(30, 3))
    g = build_mesh_graph(pts, 4)
    edges = {tuple(x) for x in g.edges}
    cliques = {t for t in itertools.combinations(range(30), 3)
               if {(t[0], t[1]), (t[0], t[2]), (t[1], t[2])} <= edges}
    assert len(cliques) > 10
    assert sorted(tuple(sorted(t)) for t in g.triangles) == sorted(cliques)
    with pytest.raises(ValueError, match="k must be in"):
        knn_edges(pts, 30)


def test_triangles_face_away_from_the_inside():
    i = np.arange(200) + 0.5  # a Fibonacci sphere around the origin
    phi, theta = np.arccos(1 - 2 * i / 200), math.pi * (1 + 5 ** 0.5) * i
    pts = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)
    g = build_mesh_graph(pts, 6, inside=np.zeros((1, 3)))
    a, b, c = (pts[g.triangles[:, k]] for k in range(3))
    assert len(g.triangles) > 200 and ((np.cross(b - a, c - a) * (a + b + c)).sum(-1) > 0).all()
    assert skeleton_points(np.zeros((21, 3)), per_bone=3).shape == (60, 3)


# --------------------------------------------------------------------------- the terms
def test_edge_is_zero_for_rigid_copies_and_scales_with_the_mesh(data):
    h, template = data
    batch, verts, root = batch_for(h), h["verts_xyz"], h["joints_xyz"][:, :1]
    R = torch.as_tensor(rotation_z(0.7) @ np.array([[1, 0, 0], [0, 0.6, -0.8], [0, 0.8, 0.6]]))
    e = torch.as_tensor(template.mesh_graph(5).edges)
    mean_length = ((verts[:, e[:, 0]] - verts[:, e[:, 1]]).norm(dim=-1) / h["bone"][:, None]).mean()
    for units in ("uvd", "metric"):  # the regularisers measure in bones whatever the units
        loss = CLIPHand3DLoss(weights={"joints": 1.0, **MESH}, units=units, template=template)
        assert float(loss(outputs_for(h, verts), batch)["edge"]) == pytest.approx(0.0, abs=1e-5)
        moved = (verts - root) @ R.T + root + torch.tensor([0.01, -0.02, 0.03], dtype=torch.float64)
        assert float(loss(outputs_for(h, moved), batch)["edge"]) == pytest.approx(0.0, abs=1e-5)
        scaled = root + 1.3 * (verts - root)
        assert float(loss(outputs_for(h, scaled), batch)["edge"]) == pytest.approx(0.3 * float(mean_length), rel=1e-4)
    tri = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]])
    assert float(edge_length_error(2 * tri, tri, torch.tensor([[0, 1], [0, 2], [1, 2]]))) == pytest.approx(
        (1 + 1 + 2 ** 0.5) / 3)


@pytest.mark.parametrize("degrees", [30.0, 90.0])
def test_normal_of_a_triangle_turned_about_a_leg(degrees):
    t = math.radians(degrees)
    tri = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]])  # normal +z
    turned = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, math.cos(t), math.sin(t)]]])  # about the x leg
    faces = torch.tensor([[0, 1, 2]])
    # sides: (1,0,0) stays in the plane; (0,cos,sin) has |cos| = sin t with +z; (-1,cos,sin)/sqrt2 has sin t/sqrt2
    assert float(normal_error(turned, tri, faces)) == pytest.approx((math.sin(t) + math.sin(t) / 2 ** 0.5) / 3, rel=1e-6)
    spun = tri @ torch.as_tensor(rotation_z(1.1), dtype=torch.float32).T + torch.tensor([3.0, -1.0, 2.0])
    assert float(normal_error(spun, tri, faces)) == pytest.approx(0.0, abs=1e-6)  # in its own plane
    assert float(normal_error(tri, tri, faces)) == 0.0


def test_normal_is_zero_for_the_truth_and_a_translated_copy(data):
    h, template = data
    loss = CLIPHand3DLoss(weights={"joints": 1.0, **MESH}, units="metric", template=template)
    batch = batch_for(h)
    assert float(loss(outputs_for(h, h["verts_xyz"]), batch)["normal"]) == pytest.approx(0.0, abs=1e-4)
    moved = h["verts_xyz"] + torch.tensor([0.02, 0.01, -0.03], dtype=torch.float64)
    assert float(loss(outputs_for(h, moved), batch)["normal"]) == pytest.approx(0.0, abs=1e-4)


def test_the_terms_appear_only_where_they_weigh_and_there_are_meshes(data):
    h, template = data
    batch, out = batch_for(h), outputs_for(h, h["verts_xyz"])
    assert {"edge", "normal"} <= set(CLIPHand3DLoss(weights={"joints": 1.0, **MESH}, template=template)(out, batch))
    off = CLIPHand3DLoss(weights={"joints": 1.0}, template=template)
    assert off.graph is None and not {"edge", "normal"} & set(off(out, batch))  # the default: as before
    on = CLIPHand3DLoss(weights={"joints": 1.0, **MESH}, template=template)
    assert not {"edge", "normal"} & set(on({**out, "verts": None}, batch))  # a joints-only model
    no_meshes = {k: v for k, v in batch.items() if k != "verts_uvd"}
    assert not {"edge", "normal"} & set(on(out, no_meshes))
    with pytest.raises(ConfigError, match="built without the mesh template"):
        CLIPHand3DLoss(weights={"joints": 1.0, "edge": 1.0})(out, batch)


def test_build_criterion_hands_the_template_over_when_a_regulariser_weighs(data):
    _, template = data
    cfg = compose_config("train", ["loss.weights.edge=1.0", "loss.weights.clip=0"])
    crit = build_criterion(cfg, template)
    assert np.array_equal(crit.graph.edges, template.mesh_graph(cfg.loss.graph_neighbours).edges)
    assert build_criterion(cfg).graph is None  # the released import builds its loss without a template
    assert build_criterion(compose_config("train", ["loss.weights.clip=0"]), template).graph is None


def test_the_regularisers_alone_keep_the_mesh_regressor_training(data):
    """Only the regularisers reach the last stage when joints and verts weigh 0: it must not be frozen."""
    _, template = data
    ds = SyntheticHands(length=4, seed=3, img_size=IMG, num_verts=200, augment=CropAugment())
    batch = batch_to_device(next(iter(DataLoader(ds, batch_size=2))), torch.device("cpu"))
    torch.manual_seed(0)
    model = CLIPHand3D(template=template, img_size=IMG, backbone="resnet18", deconv_channels=16, depth_bins=16,
                       joint_feature_hidden=16, token_dim=32, widths=(32, 16, 16, 8, 8), blocks_per_stage=1,
                       heads=2, embed_dim=32)
    crit = CLIPHand3DLoss(weights={"joints_coarse": 1.0, **MESH}, units="metric", template=template)
    module = TrainingModule(model, crit)
    assert not any(n.startswith(("model.regressor.stages.3.", "model.joint_features.")) for n in module.frozen)
    _, terms = module(batch)
    crit.total(terms).backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing and {"edge", "normal"} <= set(terms)
