"""Toyworld relations: each one computed by a fixed rule from the simulation and the drawn masks.

Everything is decided on the video's sampled frames j = 0..T-1 (TRASER's ~1 fps
sampling), at times t_j = round(frame_indices[j] / fps, 6) (the record's
timestamps). Terms:

- visible(A, j): A's visible mask on frame j (the record's mask) is non-empty.
- c_A(j): centroid of that mask; d_j = |c_A(j) - c_B(j)|; box_A(j): its tight box.
- in_image(A, j): A's whole shape (drawn alone) covers at least one pixel of frame j.
- depth: every object has one; smaller = nearer the camera.
- V = min(width, height), L = max(width, height); s_min = MIN_SPEED * V px/s.
- On an interval (j, j+1) of length dt = t_{j+1} - t_j: disp_A = c_A(j+1) - c_A(j);
  moving(A) means |disp_A| >= s_min * dt.
- rho_A = sqrt(max_j area_A(j) / pi), the radius of A's largest visible mask.

Spans are inclusive [start, end] in seconds. A per-frame rule holding on the
consecutive sampled frames j..k gives the span [t_j, t_k] (a single frame gives
[t_j, t_j]); a per-interval rule holding on the consecutive intervals
(j, j+1) .. (k-1, k) gives [t_j, t_k]. "moving toward", "moving away from" and
"following" describe sustained motion: they keep only runs of at least
SUSTAINED_INTERVALS intervals. A relation holding in several separate runs has
several spans. Object ids are the record's; -1 is the camera.

Constants: MIN_SPEED = 0.03, OCCLUSION_MIN_PX = 10, ABOVE_MAX_GAP = 0.25,
NEAR = 0.4, HEADING_COS = 0.8, SUSTAINED_INTERVALS = 2.

spatial (per frame; both objects visible):
- A "in front of" B and B "behind" A: depth(A) < depth(B) and A's visible mask
  covers at least OCCLUSION_MIN_PX pixels of B's whole shape (A hides part of B).
- A "on top of" B: A rests on B's top: A is carried by B in the simulation (its
  bottom is half a pixel above B's top, centered on it up to 0.3 of B's radius).
- A "above" B and B "below" A: neither carries the other; the boxes overlap
  horizontally by at least half the narrower box width; and B's top is below
  A's bottom by a gap of 2 px up to ABOVE_MAX_GAP * height.

motion (per interval; both objects visible on both frames):
- A "moving toward" B: moving(A); d_{j+1} <= d_j - s_min*dt; disp_A points at B
  (disp_A . (c_B(j) - c_A(j)) >= HEADING_COS |disp_A| d_j); min(d_j, d_{j+1}) <= NEAR * L.
- A "moving away from" B: moving(A); d_{j+1} >= d_j + s_min*dt; disp_A points away
  from B (disp_A . (c_A(j) - c_B(j)) >= HEADING_COS |disp_A| d_j); min(d_j, d_{j+1}) <= NEAR * L.
- A "following" B: moving(A) and moving(B); cos(disp_A, disp_B) >= 0.9; B is
  ahead of A ((c_B - c_A)(j+1) . disp_B / |disp_B| >= 0.7 d_{j+1}); d_{j+1} <= NEAR * L;
  neither carries the other.
- A "passing" B: moving(A); with u = disp_A / |disp_A| and r = c_A - c_B, r(j).u < 0
  < r(j+1).u (A goes from behind B to past it along its own heading) while gaining
  at least (rho_A + rho_B) / 2 on B along u; the side offset |r x u| <= rho_A + rho_B
  on both frames; A and B do not collide in the interval.

event_level:
- A "collides with" B: the physics logs a contact of A and B (same depth lane,
  touching and closing in) at time t_c, A being the faster of the two just before;
  both shapes are in the image then, t_c <= t_{T-1}, and each is visible on frame
  j or j+1, where t_j <= t_c < t_{j+1}. Span [t_j, t_{j+1}] (the sampled frames
  around the contact; [t_j, t_j] when t_c = t_j is the last sampled frame).
- A "enters" -1 (the camera's view): a run of frames with in_image(A) that starts
  at j >= 1 (A was out of the image on frame j-1); span [t_e, t_e] at the first
  frame e of the run where A is visible.
- A "exits" -1: a run of frames with in_image(A) followed by a frame where A is
  out of the image; span [t_x, t_x] at the last frame x of the run where A is visible.

stateful (per interval; both visible on both frames):
- A "riding on" B: A is carried by B on frames j and j+1 and moving(B).
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from data_gen.record import CAMERA_ID, Relation
from data_gen.toyworld.draw import silhouette
from data_gen.toyworld.world import PHYSICS_HZ, Scene

MIN_SPEED = 0.03  # s_min as a fraction of the shorter side, per second
OCCLUSION_MIN_PX = 10
ABOVE_MAX_GAP = 0.25
NEAR = 0.4
HEADING_COS = 0.8
SUSTAINED_INTERVALS = 2
SUSTAINED = ("moving toward", "moving away from", "following")

PREDICATES: dict[str, str] = {
    "in front of": "spatial", "behind": "spatial", "on top of": "spatial", "above": "spatial", "below": "spatial",
    "moving toward": "motion", "moving away from": "motion", "following": "motion", "passing": "motion",
    "collides with": "event_level", "enters": "event_level", "exits": "event_level",
    "riding on": "stateful",
}


class FrameFacts:
    """What the rules read, per body and sampled frame: measured from the label maps and the simulation."""

    def __init__(self, scene: Scene, frame_indices: list[int], labels: np.ndarray):
        n, t = len(scene.bodies), len(frame_indices)
        self.frame_indices = list(frame_indices)
        self.steps = [scene.step_of_frame(f) for f in frame_indices]
        self.area = np.zeros((n, t), np.int64)
        self.centroid = np.zeros((n, t, 2))
        self.box = np.zeros((n, t, 4))  # x0, y0, x1, y1 (exclusive ends), like rle.bbox
        self.in_image = np.zeros((n, t), bool)
        self.occluded_by = np.zeros((n, n, t), np.int64)  # [a, b, j]: pixels of b's shape showing a
        self.carried_by = np.stack([scene.carried_by[:, s] for s in self.steps], axis=1)
        ys, xs = np.mgrid[0:scene.height, 0:scene.width]
        for j in range(t):
            lab = labels[j].astype(np.int64).ravel() + 1  # 0 = background
            area = np.bincount(lab, minlength=n + 1)[1:]
            self.area[:, j] = area
            sx = np.bincount(lab, weights=xs.ravel(), minlength=n + 1)[1:]
            sy = np.bincount(lab, weights=ys.ravel(), minlength=n + 1)[1:]
            seen = area > 0
            self.centroid[seen, j, 0] = sx[seen] / area[seen]
            self.centroid[seen, j, 1] = sy[seen] / area[seen]
            for i in np.flatnonzero(seen):
                rows = np.flatnonzero((labels[j] == i).any(axis=1))
                cols = np.flatnonzero((labels[j] == i).any(axis=0))
                self.box[i, j] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            for body in scene.bodies:
                sil = silhouette(scene, body, self.steps[j])
                if sil is None:
                    continue
                y0, x0, inside = sil
                self.in_image[body.index, j] = True
                under = labels[j][y0:y0 + inside.shape[0], x0:x0 + inside.shape[1]][inside].astype(np.int64) + 1
                self.occluded_by[:, body.index, j] = np.bincount(under, minlength=n + 1)[1:]
        self.visible = self.area > 0
        self.rho = np.sqrt(self.area.max(axis=1) / math.pi)


def compute_relations(scene: Scene, frame_indices: list[int], timestamps: list[float],
                      labels: np.ndarray) -> list[Relation]:
    """All relations of the module docstring's rules; labels: int [T, H, W] label maps of the sampled frames."""
    facts = FrameFacts(scene, frame_indices, labels)
    spans: dict[tuple[int, str, int], list[tuple[float, float]]] = {}
    for key, holds in _frame_rules(scene, facts).items():
        spans[key] = _runs(holds, timestamps, per_interval=False)
    for key, holds in _interval_rules(scene, facts, timestamps).items():
        spans[key] = _runs(holds, timestamps, per_interval=True,
                           min_length=SUSTAINED_INTERVALS if key[1] in SUSTAINED else 1)
    spans.update(_events(scene, facts, frame_indices, timestamps))
    relations = []
    for (a, predicate, b), span_list in spans.items():
        if span_list:
            obj = CAMERA_ID if b == CAMERA_ID else b + 1
            relations.append(Relation(subject=a + 1, predicate=predicate, object=obj, category=PREDICATES[predicate],
                                      spans=span_list))
    relations.sort(key=lambda r: (r.spans[0][0], r.subject, r.predicate, r.object))
    return relations


def _carries(facts: FrameFacts, a: int, b: int, j: int) -> bool:
    return facts.carried_by[a, j] == b or facts.carried_by[b, j] == a


def _frame_rules(scene: Scene, facts: FrameFacts) -> dict[tuple[int, str, int], np.ndarray]:
    """Spatial rules: (subject, predicate, object) body indices -> holds on each sampled frame."""
    n, t = facts.area.shape
    rules: dict[tuple[int, str, int], np.ndarray] = defaultdict(lambda: np.zeros(t, bool))
    vis, box = facts.visible, facts.box
    for j in range(t):
        for a in range(n):
            for b in range(n):
                if a == b or not (vis[a, j] and vis[b, j]):
                    continue
                if scene.bodies[a].depth < scene.bodies[b].depth and facts.occluded_by[a, b, j] >= OCCLUSION_MIN_PX:
                    rules[(a, "in front of", b)][j] = True
                    rules[(b, "behind", a)][j] = True
                if facts.carried_by[a, j] == b:
                    rules[(a, "on top of", b)][j] = True
                if not _carries(facts, a, b, j):
                    overlap = min(box[a, j, 2], box[b, j, 2]) - max(box[a, j, 0], box[b, j, 0])
                    narrower = min(box[a, j, 2] - box[a, j, 0], box[b, j, 2] - box[b, j, 0])
                    gap = box[b, j, 1] - box[a, j, 3]
                    if overlap >= 0.5 * narrower and 2 <= gap <= ABOVE_MAX_GAP * scene.height:
                        rules[(a, "above", b)][j] = True
                        rules[(b, "below", a)][j] = True
    return rules


def _interval_rules(scene: Scene, facts: FrameFacts,
                    timestamps: list[float]) -> dict[tuple[int, str, int], np.ndarray]:
    """Motion and stateful rules: (subject, predicate, object) -> holds on each interval (j, j+1)."""
    n, t = facts.area.shape
    rules: dict[tuple[int, str, int], np.ndarray] = defaultdict(lambda: np.zeros(max(t - 1, 0), bool))
    s_min = MIN_SPEED * min(scene.width, scene.height)
    far = NEAR * max(scene.width, scene.height)
    contact_intervals = _contact_intervals(scene, facts.frame_indices)
    c = facts.centroid
    for j in range(t - 1):
        dt = timestamps[j + 1] - timestamps[j]
        both = facts.visible[:, j] & facts.visible[:, j + 1]
        disp = c[:, j + 1] - c[:, j]
        speed = np.linalg.norm(disp, axis=1)
        moving = both & (speed >= s_min * dt)
        for a in range(n):
            for b in range(n):
                if a == b or not (both[a] and both[b]):
                    continue
                d0, d1 = np.linalg.norm(c[a, j] - c[b, j]), np.linalg.norm(c[a, j + 1] - c[b, j + 1])
                if moving[a] and min(d0, d1) <= far:
                    heading = float(disp[a] @ (c[b, j] - c[a, j]))
                    if d1 <= d0 - s_min * dt and heading >= HEADING_COS * speed[a] * d0:
                        rules[(a, "moving toward", b)][j] = True
                    if d1 >= d0 + s_min * dt and -heading >= HEADING_COS * speed[a] * d0:
                        rules[(a, "moving away from", b)][j] = True
                if (moving[a] and moving[b] and d1 <= far and not _carries(facts, a, b, j)
                        and not _carries(facts, a, b, j + 1)):
                    aligned = float(disp[a] @ disp[b]) >= 0.9 * speed[a] * speed[b]
                    ahead = float((c[b, j + 1] - c[a, j + 1]) @ disp[b]) >= 0.7 * d1 * speed[b]
                    if aligned and ahead:
                        rules[(a, "following", b)][j] = True
                if moving[a] and (min(a, b), max(a, b), j) not in contact_intervals:
                    u = disp[a] / speed[a]
                    r0, r1 = c[a, j] - c[b, j], c[a, j + 1] - c[b, j + 1]
                    side = facts.rho[a] + facts.rho[b]
                    if (r0 @ u < 0 < r1 @ u and (r1 - r0) @ u >= side / 2 and abs(_cross(r0, u)) <= side
                            and abs(_cross(r1, u)) <= side):
                        rules[(a, "passing", b)][j] = True
                if facts.carried_by[a, j] == b and facts.carried_by[a, j + 1] == b and moving[b]:
                    rules[(a, "riding on", b)][j] = True
    return rules


def _cross(r: np.ndarray, u: np.ndarray) -> float:
    return float(r[0] * u[1] - r[1] * u[0])


def _runs(holds: np.ndarray, timestamps: list[float], per_interval: bool,
          min_length: int = 1) -> list[tuple[float, float]]:
    """Spans of the runs of True in `holds` that are at least `min_length` entries long."""
    out = []
    j = 0
    while j < len(holds):
        if not holds[j]:
            j += 1
            continue
        k = j
        while k + 1 < len(holds) and holds[k + 1]:
            k += 1
        if k - j + 1 >= min_length:
            out.append((timestamps[j], timestamps[k + 1] if per_interval else timestamps[k]))
        j = k + 1
    return out


def _bracket(frame_indices: list[int], fps: int, step: int) -> int:
    """Index j of the last sampled frame at or before physics step `step`."""
    steps = np.asarray(frame_indices) * (PHYSICS_HZ // fps)
    return int(np.searchsorted(steps, step, side="right")) - 1


def _contact_intervals(scene: Scene, frame_indices: list[int]) -> set[tuple[int, int, int]]:
    """(body a, body b, j) for every contact of a < b between sampled frames j and j+1."""
    out = set()
    for contact in scene.contacts:
        j = _bracket(frame_indices, scene.fps, contact.step)
        if 0 <= j:
            a, b = sorted((contact.striker, contact.other))
            out.add((a, b, j))
    return out


def _events(scene: Scene, facts: FrameFacts, frame_indices: list[int],
            timestamps: list[float]) -> dict[tuple[int, str, int], list[tuple[float, float]]]:
    t = len(frame_indices)
    events: dict[tuple[int, str, int], list[tuple[float, float]]] = defaultdict(list)
    for contact in scene.contacts:
        a, b = contact.striker, contact.other
        j = _bracket(frame_indices, scene.fps, contact.step)
        if j < 0 or j >= t or (j == t - 1 and contact.step != facts.steps[j]):
            continue  # before the first or after the last sampled frame: no frame shows it
        if not _in_image_at(scene, a, contact.step) or not _in_image_at(scene, b, contact.step):
            continue
        k = min(j + 1, t - 1)
        if not (facts.visible[a, j] or facts.visible[a, k]) or not (facts.visible[b, j] or facts.visible[b, k]):
            continue
        span = (timestamps[j], timestamps[k])
        if span not in events[(a, "collides with", b)]:
            events[(a, "collides with", b)].append(span)
    for body in scene.bodies:
        i = body.index
        j = 0
        while j < t:
            if not facts.in_image[i, j]:
                j += 1
                continue
            k = j
            while k + 1 < t and facts.in_image[i, k + 1]:
                k += 1
            seen = [m for m in range(j, k + 1) if facts.visible[i, m]]
            if seen and j >= 1:
                events[(i, "enters", CAMERA_ID)].append((timestamps[seen[0]], timestamps[seen[0]]))
            if seen and k + 1 < t:
                events[(i, "exits", CAMERA_ID)].append((timestamps[seen[-1]], timestamps[seen[-1]]))
            j = k + 1
    return events


def _in_image_at(scene: Scene, i: int, step: int) -> bool:
    return silhouette(scene, scene.bodies[i], step) is not None
