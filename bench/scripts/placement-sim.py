#!/usr/bin/env python3
"""How replicas with no shared state place prefix families: a simulation.

Each of R router replicas sees every family's requests in its own random
order (each request goes to a random replica, as in `router-bench quality
--daemon-replicas 3`) and places a family when it first sees it. Four
schemes, 200 seeds each, four backends, epsilon 0.25:

- rendezvous: the best-scored backend; replicas agree, but the layout is
  lumpy (what router-daemon does by default);
- arrival: the placement bound (`--placement-epsilon`), counting this
  replica's own placements in the order it made them: even, but replicas
  disagree;
- rank: a family weighed only against the known families ranked above it
  (by seed), each where the same rule puts it: order-independent for the
  families above, but no better on either count, since the families
  below were placed before they were known;
- re-place: rank, recomputed on every request, moving the family when its
  rank place changes: replicas converge on one even layout, at the cost of
  a re-prefill per move.

Prints, per family count: copies per family across replicas (1.00: every
replica sends a family to the same backend), the busiest backend's
families / the mean for one replica, and for re-place, moves per family.
Usage: bench/scripts/placement-sim.py
"""
import hashlib
import random
import statistics

BACKENDS = 4
EPSILON = 0.25
REQUESTS_PER_FAMILY = 32
SEEDS = 200


def h(*parts):
    return int(hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest(), 16)


def within(counts, i):
    total = sum(counts) + 1
    return counts[i] + 1 <= (1 + EPSILON) * total / len(counts) or counts[i] <= min(counts)


def rendezvous(family):
    return sorted(range(BACKENDS), key=lambda b: -h(b, family))


def pick(family, counts):
    return next(b for b in rendezvous(family) if within(counts, b))


def rank_place(family, known):
    counts = [0] * BACKENDS
    for other in sorted((f for f in known if f > family), reverse=True):
        counts[pick(other, counts)] += 1
    return pick(family, counts)


def run(families_n, replicas, scheme, seed):
    rnd = random.Random(seed)
    families = [h("family", seed, i) for i in range(families_n)]
    requests = [f for f in families for _ in range(REQUESTS_PER_FAMILY)]
    rnd.shuffle(requests)
    placed = [dict() for _ in range(replicas)]
    counts = [[0] * BACKENDS for _ in range(replicas)]
    moves = 0
    for family in requests:
        r = rnd.randrange(replicas)
        if scheme == "re-place":
            placed[r].setdefault(family, None)
            backend = rank_place(family, placed[r].keys())
            moves += placed[r][family] not in (None, backend)
            placed[r][family] = backend
            continue
        if family in placed[r]:
            continue
        if scheme == "rendezvous":
            backend = rendezvous(family)[0]
        elif scheme == "arrival":
            backend = pick(family, counts[r])
            counts[r][backend] += 1
        else:
            backend = rank_place(family, set(placed[r]) | {family})
        placed[r][family] = backend
    copies = statistics.mean(len({placed[r][f] for r in range(replicas)}) for f in families)
    per_backend = [0] * BACKENDS
    for f in families:
        per_backend[placed[0][f]] += 1
    return copies, max(per_backend) / (families_n / BACKENDS), moves / families_n


def main():
    for families_n in (12, 16, 32):
        for scheme in ("rendezvous", "arrival", "rank", "re-place"):
            three = [run(families_n, 3, scheme, s) for s in range(SEEDS)]
            one = [run(families_n, 1, scheme, s) for s in range(SEEDS)]
            line = (
                f"{families_n:3} families  {scheme:10}  three replicas: "
                f"{statistics.mean(r[0] for r in three):.2f} copies per family; "
                f"one router: max/mean {statistics.mean(r[1] for r in one):.2f}"
            )
            if scheme == "re-place":
                line += f"; {statistics.mean(r[2] for r in three):.2f} moves per family"
            print(line)


if __name__ == "__main__":
    main()
