"""The toyworld simulation: who is in a video, where each object is at every moment.

A scene is drawn from `numpy.random.default_rng([seed, index])` alone, so one
(seed, index) pair always gives the same scene. Objects move in a 2.5-D world:
each has a depth (smaller = nearer the camera) inside one of three depth lanes.
Physics runs at PHYSICS_HZ (a multiple of every frame rate used) so frame f of
a video at `fps` is physics step f * PHYSICS_HZ / fps exactly.

Roles (a scene mixes several):
- wanderer: moves inside the frame, bounces off its borders once fully inside,
  changes speed and heading now and then, sometimes stops.
- traveler: comes in from outside the frame at some moment, crosses it in a
  straight line and leaves (it is removed once fully out).
- rider: starts sitting on top of a carrier (a wanderer or traveler of a larger
  size) and moves with it; it may hop off at some moment and wander on its own.
- follower: walks the path of a leader a fixed delay behind it (it is scripted:
  it never collides).
Wanderers, travelers and riders that hopped off are physical: two of them in
the same depth lane that touch bounce off each other (an elastic collision of
equal masses, logged as a contact). Objects in different lanes pass each other,
the nearer one hiding part of the farther one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import yaml

from data_gen.toyworld import shapes

PHYSICS_HZ = 60  # lcm of the frame rates 1..6: every frame lands on a physics step
NUM_LANES = 3
CARRIER_SHAPES = ("circle", "square", "hexagon")  # round or flat tops a rider can sit on


@dataclass(frozen=True)
class ToyworldConfig:
    """The knobs of `generate_video(seed, index, **knobs)`."""
    min_objects: int = 3
    max_objects: int = 8
    min_duration: int = 4  # seconds (whole seconds, so num_frames = duration * fps)
    max_duration: int = 40
    fps_choices: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    min_side: int = 224  # frame width and height are drawn from min_side..max_side in side_step steps
    max_side: int = 448
    side_step: int = 28

    @classmethod
    def from_knobs(cls, **knobs) -> "ToyworldConfig":
        known = {f.name for f in fields(cls)}
        for name in knobs:
            if name not in known:
                raise TypeError(f"unknown toyworld knob {name!r}; known: {sorted(known)}")
        if "fps_choices" in knobs:
            knobs["fps_choices"] = tuple(int(f) for f in knobs["fps_choices"])
        return cls(**knobs).validate()

    @staticmethod
    def parse_knobs(items: list[str]) -> dict:
        """Command-line `--knob KEY=VALUE` items -> {key: YAML value}, checked as `from_knobs` checks them
        (ValueError for a malformed item or a bad value, TypeError for an unknown key)."""
        bad = [item for item in items if "=" not in item]
        if bad:
            raise ValueError(f"--knob {bad[0]!r}: expected KEY=VALUE")
        knobs = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items)}
        ToyworldConfig.from_knobs(**dict(knobs))
        return knobs

    def validate(self) -> "ToyworldConfig":
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"min_objects={self.min_objects}, max_objects={self.max_objects}: "
                             "need 1 <= min_objects <= max_objects")
        if not 1 <= self.min_duration <= self.max_duration:
            raise ValueError(f"min_duration={self.min_duration}, max_duration={self.max_duration}: "
                             "need 1 <= min_duration <= max_duration (seconds)")
        if not self.fps_choices or any(PHYSICS_HZ % f for f in self.fps_choices):
            raise ValueError(f"fps_choices={self.fps_choices}: each must divide {PHYSICS_HZ}")
        if not (16 <= self.min_side <= self.max_side and self.side_step >= 1):
            raise ValueError(f"min_side={self.min_side}, max_side={self.max_side}, side_step={self.side_step}: "
                             "need 16 <= min_side <= max_side and side_step >= 1")
        return self


@dataclass
class Body:
    """One object of the scene and the script it follows."""
    index: int  # position in Scene.bodies; the record's object id is index + 1
    shape: str
    color: str
    size: str
    texture: str
    radius: float  # outer radius in pixels
    depth: float  # smaller = nearer the camera
    lane: int
    texture_angle: float
    role: str  # wanderer | traveler | rider | follower
    spawn_step: int = 0
    p0: tuple[float, float] = (0.0, 0.0)
    v0: tuple[float, float] = (0.0, 0.0)
    schedule: list[tuple[int, float, float]] = field(default_factory=list)  # (step, vx, vy) velocity changes
    carrier: int = -1  # riders: index of the body they start on
    offset: tuple[float, float] = (0.0, 0.0)  # riders: position relative to the carrier
    dismount_step: int = -1  # riders: step they hop off (-1: never)
    hop: tuple[float, float] = (0.0, 0.0)  # riders: velocity added to the carrier's when hopping off
    leader: int = -1  # followers: index of the body they follow
    lag_steps: int = 0  # followers: delay behind the leader

    @property
    def object_id(self) -> int:
        return self.index + 1

    @property
    def collision_radius(self) -> float:
        return self.radius * shapes.COLLISION_FRACTION[self.shape]

    @property
    def top(self) -> float:
        return shapes.extent(self.shape)[0] * self.radius

    @property
    def bottom(self) -> float:
        return shapes.extent(self.shape)[1] * self.radius


@dataclass(frozen=True)
class Contact:
    step: int
    striker: int  # body index of the faster of the two just before contact
    other: int


@dataclass
class Scene:
    seed: int
    index: int
    width: int
    height: int
    fps: int
    duration: int  # seconds
    bodies: list[Body]
    background: np.ndarray  # uint8 [H, W, 3]
    pos: np.ndarray  # float64 [num_bodies, num_steps, 2]: center (x, y) in pixels
    present: np.ndarray  # bool [num_bodies, num_steps]: the object exists (it may still be outside the frame)
    carried_by: np.ndarray  # int [num_bodies, num_steps]: index of the carrier, -1 when not carried
    contacts: list[Contact]

    @property
    def num_frames(self) -> int:
        return self.duration * self.fps

    def step_of_frame(self, frame: int) -> int:
        return frame * (PHYSICS_HZ // self.fps)

    @property
    def video_id(self) -> str:
        return f"toy-{self.seed}-{self.index:06d}"


# -- scene sampling ------------------------------------------------------------

def sample_scene(seed: int, index: int, config: ToyworldConfig) -> Scene:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index])
    duration = int(rng.integers(config.min_duration, config.max_duration + 1))
    fps = int(rng.choice(config.fps_choices))
    sides = np.arange(config.min_side, config.max_side + 1, config.side_step)
    width, height = int(rng.choice(sides)), int(rng.choice(sides))
    background = draw_background(rng, height, width)
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    side = min(width, height)
    bodies = [new_body(rng, i, side) for i in range(n)]
    _assign_roles(rng, bodies, width, height, duration)
    num_steps = duration * PHYSICS_HZ + 1
    pos, present, carried_by, contacts = _simulate(bodies, width, height, num_steps)
    return Scene(seed=seed, index=index, width=width, height=height, fps=fps, duration=duration, bodies=bodies,
                 background=background, pos=pos, present=present, carried_by=carried_by, contacts=contacts)


def draw_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A muted two-color gradient with mild static noise (never a flat color)."""
    c0 = rng.uniform(70, 200, 3)
    c1 = np.clip(c0 + rng.uniform(-60, 60, 3), 40, 220)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    t = (xx / width - 0.5) * math.cos(angle) + (yy / height - 0.5) * math.sin(angle) + 0.5
    img = c0 + (c1 - c0) * np.clip(t, 0, 1)[..., None]
    # Mostly gray, so the saturated object colors stand out.
    img = 0.3 * img + 0.7 * img.mean(axis=-1, keepdims=True)
    img += rng.normal(0.0, 5.0, (height, width, 1))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def new_body(rng: np.random.Generator, i: int, side: int) -> Body:
    size = str(rng.choice(list(shapes.SIZES)))
    lane = int(rng.integers(NUM_LANES))
    return Body(index=i, shape=str(rng.choice(shapes.SHAPES)), color=str(rng.choice(list(shapes.COLORS))),
                size=size, texture=str(rng.choice(shapes.TEXTURES)), radius=shapes.SIZES[size] * side,
                depth=lane + float(rng.uniform(0.05, 0.95)), lane=lane,
                texture_angle=float(rng.uniform(0, math.pi)), role="wanderer")


def _unit(angle: float) -> tuple[float, float]:
    return math.cos(angle), math.sin(angle)


def _assign_roles(rng: np.random.Generator, bodies: list[Body], width: int, height: int, duration: int) -> None:
    side = min(width, height)
    pool = [int(i) for i in rng.permutation(len(bodies))]  # bodies still waiting for a role
    placed: list[Body] = []  # wanderers placed so far: new ones start clear of them

    def take() -> Body:
        return bodies[pool.pop()]

    def wanderer(b: Body, s: float, stops: bool) -> None:
        _make_wanderer(rng, b, width, height, duration, s, stops, placed)
        placed.append(b)

    def speed(lo: float = 0.07, hi: float = 0.22) -> float:
        return float(rng.uniform(lo, hi)) * side

    # A collision course: two bodies of one lane aimed at the same point.
    if len(pool) >= 2 and rng.random() < 0.6:
        a, b = take(), take()
        b.lane, b.depth = a.lane, a.lane + float(rng.uniform(0.05, 0.95))
        point = (float(rng.uniform(0.3, 0.7)) * width, float(rng.uniform(0.3, 0.7)) * height)
        heading = float(rng.uniform(0, 2 * math.pi))
        sa, sb = speed(0.1, 0.25), speed(0.05, 0.2)
        t_meet = float(rng.uniform(1.0, max(1.0, min(duration - 1.0, 0.4 * side / sa))))
        for body, s, h in ((a, sa, heading), (b, sb, heading + math.pi + float(rng.uniform(-0.5, 0.5)))):
            ux, uy = _unit(h)
            body.v0 = (s * ux, s * uy)
            body.p0 = (point[0] - body.v0[0] * t_meet, point[1] - body.v0[1] * t_meet)
            body.schedule = _wander_schedule(rng, duration, side, after=t_meet + 0.5)
        placed.extend((a, b))

    # A rider on top of a larger carrier with a round or flat top.
    if len(pool) >= 2 and rng.random() < 0.6:
        c, r = take(), take()
        if c.shape not in CARRIER_SHAPES:
            c.shape = str(rng.choice(CARRIER_SHAPES))
        if c.size == "small":
            c.size = str(rng.choice(["medium", "large"]))
            c.radius = shapes.SIZES[c.size] * side
        if rng.random() < 0.6:
            wanderer(c, speed(), stops=True)
        else:  # start far enough out that the rider on top is out of the image too
            _make_traveler(rng, c, width, height, duration, speed(0.12, 0.25),
                           extra_out=2 * shapes.SIZES["medium"] * side + 1)
        smaller = [s for s in shapes.SIZES if shapes.SIZES[s] < shapes.SIZES[c.size]]
        r.size = str(rng.choice(smaller))
        r.radius = shapes.SIZES[r.size] * side
        r.role, r.carrier, r.spawn_step = "rider", c.index, c.spawn_step
        r.lane, r.depth = c.lane, c.depth - 0.01
        dx = float(rng.uniform(-0.3, 0.3)) * c.radius if c.shape != "circle" else 0.0
        r.offset = (dx, -(c.top + r.bottom + 0.5))
        if rng.random() < 0.5:
            r.dismount_step = c.spawn_step + int(rng.uniform(0.3, 0.8) * (duration * PHYSICS_HZ - c.spawn_step))
            ux, uy = _unit(float(rng.uniform(-0.9 * math.pi, -0.1 * math.pi)))  # up-ish
            hop = speed(0.1, 0.2)
            r.hop = (hop * ux, hop * uy)

    # A follower walks its leader's path a second or more behind it.
    if len(pool) >= 2 and rng.random() < 0.5:
        f, leader = take(), take()
        f.role, f.leader = "follower", leader.index
        f.lane = int(rng.integers(NUM_LANES))
        f.depth = f.lane + float(rng.uniform(0.05, 0.95))
        # The delay keeps the follower clear of the leader (which never stops: the follower would catch up).
        lead_speed = speed(0.1, 0.22)
        clear_s = 1.4 * (leader.radius + f.radius) / lead_speed
        f.lag_steps = int(max(float(rng.uniform(0.8, 1.6)), clear_s) * PHYSICS_HZ)
        if rng.random() < 0.5:
            wanderer(leader, lead_speed, stops=False)
        else:
            _make_traveler(rng, leader, width, height, duration, lead_speed)

    # Travelers cross the frame; most enter after the start.
    for _ in range(int(rng.integers(0, min(2, len(pool)) + 1))):
        _make_traveler(rng, take(), width, height, duration, speed(0.12, 0.3))

    # Everyone else wanders; a quarter of them start still.
    while pool:
        wanderer(take(), 0.0 if rng.random() < 0.25 else speed(), stops=True)


def _make_wanderer(rng, b: Body, width: int, height: int, duration: int, s: float, stops: bool,
                   placed: list[Body]) -> None:
    b.role = "wanderer"
    margin = b.radius + 1
    for _ in range(20):  # a start clear of the wanderers already placed, if one is found quickly
        b.p0 = (float(rng.uniform(margin, width - margin)), float(rng.uniform(margin, height - margin)))
        if all(math.hypot(b.p0[0] - o.p0[0], b.p0[1] - o.p0[1]) > b.radius + o.radius + 2 for o in placed):
            break
    ux, uy = _unit(float(rng.uniform(0, 2 * math.pi)))
    b.v0 = (s * ux, s * uy)
    b.schedule = _wander_schedule(rng, duration, min(width, height), after=0.0, stops=stops, min_speed=s if not
                                  stops else 0.0)


def _make_traveler(rng, b: Body, width: int, height: int, duration: int, s: float, extra_out: float = 0.0) -> None:
    b.role = "traveler"
    b.spawn_step = 0 if rng.random() < 0.3 else int(rng.uniform(0, max(duration - 3, 0.5)) * PHYSICS_HZ)
    edge = int(rng.integers(4))
    along = float(rng.uniform(0.15, 0.85))
    out = b.radius + 2 + extra_out
    start = [(along * width, -out), (width + out, along * height), (along * width, height + out),
             (-out, along * height)][edge]
    target = (float(rng.uniform(0.25, 0.75)) * width, float(rng.uniform(0.25, 0.75)) * height)
    dx, dy = target[0] - start[0], target[1] - start[1]
    norm = math.hypot(dx, dy)
    b.p0 = start
    b.v0 = (s * dx / norm, s * dy / norm)


def _wander_schedule(rng, duration: int, side: int, after: float, stops: bool = True,
                     min_speed: float = 0.0) -> list[tuple[int, float, float]]:
    """Velocity changes at random moments (about one every 6 s): new heading, new speed, or a stop."""
    events = []
    t = after + float(rng.exponential(6.0))
    while t < duration:
        if stops and rng.random() < 0.3:
            events.append((int(t * PHYSICS_HZ), 0.0, 0.0))
        else:
            s = max(float(rng.uniform(0.07, 0.22)) * side, min_speed)
            ux, uy = _unit(float(rng.uniform(0, 2 * math.pi)))
            events.append((int(t * PHYSICS_HZ), s * ux, s * uy))
        t += float(rng.exponential(6.0))
    return events


# -- physics -------------------------------------------------------------------

def _simulate(bodies: list[Body], width: int, height: int, num_steps: int):
    n = len(bodies)
    dt = 1.0 / PHYSICS_HZ
    pos = np.zeros((n, num_steps, 2))
    present = np.zeros((n, num_steps), bool)
    carried_by = np.full((n, num_steps), -1, np.int64)
    x, y = [0.0] * n, [0.0] * n
    vx, vy = [0.0] * n, [0.0] * n
    alive, gone, was_inside, touched_image = [False] * n, [False] * n, [False] * n, [False] * n
    attached = [b.carrier for b in bodies]
    schedules = [{s: (a, c) for s, a, c in b.schedule} for b in bodies]
    followers = [b.index for b in bodies if b.role == "follower"]
    physical_or_rider = [b.index for b in bodies if b.role != "follower"]
    contacts: list[Contact] = []

    def physical(i: int) -> bool:
        return alive[i] and bodies[i].role != "follower" and attached[i] < 0

    for k in range(num_steps):
        for i in physical_or_rider:
            b = bodies[i]
            if gone[i]:
                continue
            if k == b.spawn_step:
                alive[i] = True
                if b.role != "rider":
                    x[i], y[i] = b.p0
                    vx[i], vy[i] = b.v0
                    continue
            if not alive[i]:
                continue
            if attached[i] >= 0 and k == b.dismount_step:
                c = attached[i]
                vx[i], vy[i] = vx[c] + b.hop[0], vy[c] + b.hop[1]
                attached[i] = -1
            elif k in schedules[i] and attached[i] < 0:
                vx[i], vy[i] = schedules[i][k]
            if attached[i] < 0:
                x[i] += vx[i] * dt
                y[i] += vy[i] * dt
        # Borders: once fully inside, everyone but travelers bounces off them (a carrier counts its rider).
        rider_height = [0.0] * n
        for i in physical_or_rider:
            if attached[i] >= 0 and alive[i]:
                rider_height[attached[i]] = max(rider_height[attached[i]], bodies[i].top + bodies[i].bottom + 0.5)
        for i in physical_or_rider:
            b = bodies[i]
            if not physical(i):
                continue
            top = b.top + rider_height[i]
            if x[i] - b.radius >= 0 and x[i] + b.radius <= width and y[i] - top >= 0 and y[i] + b.bottom <= height:
                was_inside[i] = True
            if b.role != "traveler" and was_inside[i]:
                if (x[i] - b.radius < 0 and vx[i] < 0) or (x[i] + b.radius > width and vx[i] > 0):
                    vx[i] = -vx[i]
                if (y[i] - top < 0 and vy[i] < 0) or (y[i] + b.bottom > height and vy[i] > 0):
                    vy[i] = -vy[i]
        # Collisions between physical bodies of one lane: equal masses swap their normal velocities.
        for i in physical_or_rider:
            if not physical(i):
                continue
            for j in physical_or_rider:
                if j <= i or not physical(j) or bodies[i].lane != bodies[j].lane:
                    continue
                dx, dy = x[j] - x[i], y[j] - y[i]
                reach = bodies[i].collision_radius + bodies[j].collision_radius
                dist2 = dx * dx + dy * dy
                if dist2 >= reach * reach:
                    continue
                dist = math.sqrt(dist2) or 1e-9
                nx, ny = dx / dist, dy / dist
                closing = (vx[i] - vx[j]) * nx + (vy[i] - vy[j]) * ny
                if closing > 0:
                    faster_i = math.hypot(vx[i], vy[i]) >= math.hypot(vx[j], vy[j])
                    contacts.append(Contact(step=k, striker=i if faster_i else j, other=j if faster_i else i))
                    vx[i], vy[i] = vx[i] - closing * nx, vy[i] - closing * ny
                    vx[j], vy[j] = vx[j] + closing * nx, vy[j] + closing * ny
                push = (reach - dist) / 2  # separate them so they do not stay interlocked
                x[i], y[i] = x[i] - push * nx, y[i] - push * ny
                x[j], y[j] = x[j] + push * nx, y[j] + push * ny
        # Riders sit on their carrier and share its fate.
        for i in physical_or_rider:
            c = attached[i]
            if c >= 0 and alive[i]:
                x[i], y[i] = x[c] + bodies[i].offset[0], y[c] + bodies[i].offset[1]
                vx[i], vy[i] = vx[c], vy[c]
        # Leavers that have been in the image and are now fully out (rider included) are gone for good.
        in_image = [False] * n
        for i in physical_or_rider:
            b = bodies[i]
            in_image[i] = alive[i] and (x[i] + b.radius > 0 and x[i] - b.radius < width and y[i] + b.bottom > 0
                                        and y[i] - b.top < height)
            touched_image[i] = touched_image[i] or in_image[i]
        for i in physical_or_rider:
            out = alive[i] and bodies[i].role == "traveler" and touched_image[i] and not in_image[i]
            if out and not any(in_image[r] for r in physical_or_rider if attached[r] == i):
                alive[i], gone[i] = False, True
        for i in physical_or_rider:
            c = attached[i]
            if c >= 0 and gone[c] and not gone[i]:
                alive[i], gone[i] = False, True
            present[i, k] = alive[i]
            pos[i, k] = (x[i], y[i])
            carried_by[i, k] = attached[i] if alive[i] else -1
        # Followers replay the leader's path lag_steps behind.
        for i in followers:
            b = bodies[i]
            lead, past = bodies[b.leader], k - b.lag_steps
            if past >= 0:
                present[i, k] = present[b.leader, past]
                pos[i, k] = pos[b.leader, past]
            elif lead.spawn_step == 0:  # before the video: extend the leader's first motion backward
                present[i, k] = True
                pos[i, k] = (lead.p0[0] + lead.v0[0] * past * dt, lead.p0[1] + lead.v0[1] * past * dt)
    return pos, present, carried_by, contacts
