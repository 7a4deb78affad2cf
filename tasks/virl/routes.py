"""V-IRL routes: the procedural generator, and the authors' `route_infos.json` schema both ways.

A route is a start, one point per milestone (the intersections, then the destination) and,
per milestone, the heading to walk from the point before it, the landmarks seen on arrival
and the distance. The authors' file (SFTvsRL's `nyc_1k_routes/route_infos.json`) is
`[routes, number_of_routes]`; each route holds `start_place`, `dest_place`,
`route_results.{geocode_list, landmark_list}` and `milestone_info`, a text of blocks
`{"intersection_idx": "0", "landmarks": "...", "distance": "120 meters", "human_heading":
"...", "to_next_intersection_heading": "177 (south)",}` that their code parses line by line.

The generator draws routes on a perturbed street grid, from a private RNG per (seed, index)
as GeneralPoints deals hands: an orientation for the grid, 2-6 turns between the eight
compass headings (diagonal avenues included), blocks of 60-250 m, named landmarks at three
intersections in four, and a random initial heading (the authors' default when a route
has none). `write` and `load` make and read the authors' schema, so a file of their routes
and a generated one go through the same loader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from pathlib import Path

from rlheal.config import ConfigError

COMPASS = ("north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest")
NO_LANDMARK = "No landmark nearby"
EARTH_M = 6_371_000.0
TURNS = (2, 6)  # turns per generated route, inclusive
BLOCK_M = (60, 250)  # block length, metres
LANDMARK_SHARE = 0.75  # intersections with a named landmark (the destination always has one)
SIDES = ("left", "right")
# Word lists of the generated landmarks (two words, e.g. "Harbor Bakery").
_FIRST = ("Harbor", "Maple", "Union", "Liberty", "Orchard", "Summit", "Crescent", "Beacon", "Willow", "Granite", "Cedar", "Meridian")
_SECOND = ("Bakery", "Pharmacy", "Library", "Bank", "Cafe", "Theater", "Hotel", "Market", "Gallery", "School", "Museum", "Diner")


@dataclasses.dataclass(frozen=True)
class Milestone:
    """One leg: walk `heading` degrees (`direction`, its compass name) for `distance` metres
    to the next point, where `landmarks` are seen (`NO_LANDMARK` when none)."""

    heading: int
    direction: str
    landmarks: str
    distance: int


@dataclasses.dataclass(frozen=True)
class Route:
    """A start and `len(milestones)` legs; `points` are (lat, lng), the start first, the
    destination last. `seed` / `index` name the stream it was dealt from (None: loaded)."""

    start_place: str
    dest_place: str
    points: tuple[tuple[float, float], ...]
    milestones: tuple[Milestone, ...]
    init_heading: int
    seed: int | None = None
    index: int | None = None


def compass(heading: float) -> str:
    """The nearest of the eight compass names, circularly (the authors' data rule)."""
    return COMPASS[round((heading % 360) / 45) % 8]


def route_rng(seed: int, index: int, stream: str = "virl") -> random.Random:
    digest = hashlib.sha256(f"{stream}:{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _walk(point: tuple[float, float], heading: float, metres: float) -> tuple[float, float]:
    lat, lng = point
    d_lat = metres * math.cos(math.radians(heading)) / EARTH_M
    d_lng = metres * math.sin(math.radians(heading)) / (EARTH_M * math.cos(math.radians(lat)))
    return (round(lat + math.degrees(d_lat), 7), round(lng + math.degrees(d_lng), 7))


def _landmark(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_SECOND)} is on your {rng.choice(SIDES)}"


def generate(seed: int, index: int, stream: str = "virl") -> Route:
    """Route `index` of stream `seed`: a pure function of the two (and of `stream`, the
    namespace: the tiny base's pretraining corpus draws its routes from its own)."""
    rng = route_rng(seed, index, stream)
    grid = rng.uniform(0, 45)  # the street grid's orientation
    turns = rng.randint(*TURNS)
    slots, legs = rng.randrange(8), []
    for leg in range(turns + 1):
        if leg:  # a turn: any other of the eight grid directions
            slots = (slots + rng.choice((1, 2, 3, 4, 5, 6, 7))) % 8
        heading = round(grid + 45 * slots + rng.uniform(-6, 6)) % 360
        last = leg == turns
        named = last or rng.random() < LANDMARK_SHARE
        legs.append(Milestone(heading, compass(heading), _landmark(rng) if named else NO_LANDMARK, rng.randint(*BLOCK_M)))
    points = [(round(40.70 + rng.uniform(0, 0.1), 7), round(-74.02 + rng.uniform(0, 0.1), 7))]
    for m in legs:
        points.append(_walk(points[-1], m.heading, m.distance))
    # 1-359: a heading of 0 reads as "none" in the authors' schema (`from_record`)
    return Route(f"start {seed}-{index}", legs[-1].landmarks.split(" is on ")[0], tuple(points), tuple(legs), rng.randint(1, 359), seed, index)


# ---------------------------------------------------------------------------- the authors' schema


def milestone_info(route: Route) -> str:
    """The `milestone_info` text of a route, block by block as the authors' data writes it."""
    blocks = []
    for i, m in enumerate(route.milestones):
        blocks.append(
            "{\n"
            f'"intersection_idx": "{i}",\n'
            f'"landmarks": "{m.landmarks}",\n'
            f'"distance": "{m.distance} meters",\n'
            f'"human_heading": "{m.heading}",\n'
            f'"to_next_intersection_heading": "{m.heading} ({m.direction})",\n'
            "}"
        )
    return "\n".join(blocks)


def to_record(route: Route) -> dict:
    return {
        "start_place": route.start_place,
        "dest_place": route.dest_place,
        "init_heading": route.init_heading,
        "route_results": {"geocode_list": [list(p) for p in route.points[1:]], "landmark_list": [m.landmarks for m in route.milestones]},
        "start_geocode": list(route.points[0]),
        "milestone_info": milestone_info(route),
    }


def write(routes: list[Route], path: Path) -> Path:
    """`route_infos.json` in the authors' layout: `[routes, number_of_routes]`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps([[to_record(r) for r in routes], len(routes)], indent=1))
    tmp.replace(path)
    return path


def _blocks(text: str) -> list[dict[str, str]]:
    """The authors' parse of `milestone_info`: split at `}`, each line at its first `:`,
    quotes and trailing commas stripped."""
    out = []
    for block in text.split("}"):
        fields = {}
        for line in block.splitlines():
            if ":" in line:
                key, value = line.split(":", 1)
                fields[key.strip().strip('"')] = value.strip().rstrip(",").strip('"')
        if fields:
            out.append(fields)
    return out


def _heading(value: str, where: str) -> tuple[int, str]:
    """`'177 (south)'` -> (177, 'south'), range-checked."""
    try:
        degrees, name = value.split("(", 1)
        heading, direction = int(degrees.strip()), name.split(")")[0].strip()
    except ValueError:
        raise ConfigError(f"{where}.to_next_intersection_heading: {value!r} is not '<degrees> (<compass name>)'") from None
    if not 0 <= heading <= 359:
        raise ConfigError(f"{where}.to_next_intersection_heading: heading {heading} is outside 0-359")
    if direction not in COMPASS:
        raise ConfigError(f"{where}.to_next_intersection_heading: {direction!r} is not one of {list(COMPASS)}")
    return heading, direction


def from_record(record: dict, where: str) -> Route:
    """One route of the authors' schema; every problem is named by its place in the file."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: a route is an object, got {type(record).__name__}")
    for key in ("start_place", "dest_place", "route_results", "milestone_info"):
        if key not in record:
            raise ConfigError(f"{where}: missing field {key!r}")
    results = record["route_results"]
    geocodes = results.get("geocode_list") if isinstance(results, dict) else None
    if not isinstance(geocodes, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in geocodes):
        raise ConfigError(f"{where}.route_results.geocode_list: a list of [lat, lng] pairs is needed")
    blocks = _blocks(str(record["milestone_info"]))
    if len(blocks) != len(geocodes):
        raise ConfigError(f"{where}.milestone_info: {len(blocks)} milestones for {len(geocodes)} points of route_results.geocode_list")
    # The authors geocode the start from start_place (online); offline, a record without
    # start_geocode starts at its first point (leg lengths come from `distance`).
    start = record.get("start_geocode", geocodes[0] if geocodes else None)
    if start is not None and not (isinstance(start, (list, tuple)) and len(start) == 2):
        raise ConfigError(f"{where}.start_geocode: {start!r} is not a [lat, lng] pair")
    try:
        points = [(float(a), float(b)) for a, b in ([start] + geocodes if start is not None else [])]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.route_results.geocode_list: coordinates must be numbers") from None
    if len(points) < 2 or not blocks:
        raise ConfigError(f"{where}: a route needs at least two points (a start and a destination)")
    legs = []
    for i, b in enumerate(blocks):
        heading, direction = _heading(b.get("to_next_intersection_heading", ""), f"{where}.milestone_info[{i}]")
        try:
            distance = int(float(b.get("distance", "0 meters").split()[0]))
        except (ValueError, IndexError):
            raise ConfigError(f"{where}.milestone_info[{i}].distance: {b.get('distance')!r} is not '<metres> meters'") from None
        legs.append(Milestone(heading, direction, b.get("landmarks", NO_LANDMARK), distance))
    init = record.get("init_heading", 0)
    if isinstance(init, bool) or not isinstance(init, int) or not 0 <= init <= 359:
        raise ConfigError(f"{where}.init_heading: {init!r} is not a heading in 0-359")
    if init == 0:  # the authors: none (or 0) means a random heading; ours is drawn from the route's content
        init = random.Random(repr(("virl-heading", points, legs))).randint(0, 359)
    return Route(str(record["start_place"]), str(record["dest_place"]), tuple(points), tuple(legs), init)


def load(path: Path) -> list[Route]:
    """The routes of a `route_infos.json`; a file that does not match is refused with the file
    and the field named."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable JSON routes file ({err})") from None
    if not (isinstance(data, list) and len(data) == 2 and isinstance(data[0], list)):
        raise ConfigError(f"{path}: expected [routes, number_of_routes] (the authors' route_infos.json)")
    if data[1] != len(data[0]):
        raise ConfigError(f"{path}: number_of_routes is {data[1]!r} but the file holds {len(data[0])} routes")
    routes = [from_record(r, f"{path}: routes[{i}]") for i, r in enumerate(data[0])]
    if not routes:
        raise ConfigError(f"{path}: holds no route")
    return routes
