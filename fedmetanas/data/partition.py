"""Split sample indices over clients (IID, label-Dirichlet, shards) as pure numpy functions.

Every function takes its randomness as an explicit `np.random.Generator`, returns one sorted int64
index array per client, and puts every sample index in exactly one client, so a partition is a
pure function of (labels, scheme, parameters, seed) and can be hashed to check a resume.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards")


def _as_labels(labels: np.ndarray) -> np.ndarray:
    """Labels as a non-empty 1-D int64 array (the one shape every scheme needs)."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _check_num_clients(num_clients: int, n: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"federated.num_clients must be an integer >= 1, got {num_clients!r}; set it to 1 or more")
    if num_clients > n:
        raise ValueError(f"federated.num_clients ({num_clients}) exceeds the number of samples ({n}); "
                         "use fewer clients or a larger dataset")


def _finish(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Sorted int64 copies: sorting makes the result independent of how indices were gathered."""
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle all indices and cut them into num_clients near-equal parts (sizes differ by at most 1)."""
    labels = _as_labels(labels)
    _check_num_clients(num_clients, len(labels))
    return _finish(np.array_split(rng.permutation(len(labels)), num_clients))


MAX_TRIES = 1000  # complete Dirichlet redraws before a partition is given up (data.min_samples)


def _dirichlet_draws(labels: np.ndarray, num_clients: int, alpha: float,
                     rng: np.random.Generator) -> Iterator[tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]]:
    """Endless Dirichlet draws: per draw, each class's shuffled members with the cut points that give each
    client its piece, and the client sizes that result.

    A draw builds nothing per client (O(n + classes x clients) numpy work, milliseconds at 10,000 clients):
    most draws of a demanding `min_samples` are rejected, and cutting every draw into per-client arrays
    made a 10,000-client partition take ~0.1 s per draw. The random stream is the one the FedML-style
    loop has always drawn (permutation, then Dirichlet proportions, per class), so partitions are unchanged.
    """
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    cap = len(labels) / num_clients
    while True:
        sizes = np.zeros(num_clients, dtype=np.int64)
        pieces = []
        for members in by_class:
            idx = rng.permutation(members)
            props = rng.dirichlet(np.full(num_clients, float(alpha)))
            masked = props * (sizes < cap)
            # With tiny alpha every open client can draw exactly 0; fall back to the unmasked draw.
            props = masked / masked.sum() if masked.sum() > 0 else props / props.sum()
            cuts = (np.cumsum(props) * len(idx)).astype(np.int64)[:-1]
            sizes += np.diff(cuts, prepend=0, append=len(idx))
            pieces.append((idx, cuts))
        yield pieces, sizes


def _cut(pieces: list[tuple[np.ndarray, np.ndarray]], sizes: np.ndarray) -> list[np.ndarray]:
    """The accepted draw's per-client index arrays (sorted; views into one array): each class's shuffled
    members go to the clients its cut points name, then one sort by (client, index) groups them."""
    owners = [np.repeat(np.arange(len(sizes)), np.diff(cuts, prepend=0, append=len(idx))) for idx, cuts in pieces]
    members = np.concatenate([idx for idx, _ in pieces])
    order = np.lexsort((members, np.concatenate(owners)))
    return np.split(members[order], np.cumsum(sizes)[:-1])


def largest_min_samples(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
                        max_tries: int = MAX_TRIES) -> int:
    """The largest `data.min_samples` that `dirichlet` accepts with this generator: the best smallest client
    over its `max_tries` draws (the draws do not depend on min_samples; the first draw whose smallest client
    holds min_samples is taken). 0: every draw leaves some client without a sample, so no value works.

    Exact and cheap (sizes only, milliseconds a draw); it stops early once a draw reaches the ceiling
    n // num_clients, which no draw can beat.
    """
    labels = _as_labels(labels)
    _check_num_clients(num_clients, len(labels))
    ceiling, best = len(labels) // num_clients, 0
    for _, (_, sizes) in zip(range(max_tries), _dirichlet_draws(labels, num_clients, alpha, rng)):
        best = max(best, int(sizes.min()))
        if best >= ceiling:
            break
    return best


def _min_samples_error(n: int, num_clients: int, alpha: float, min_samples: int, best: int, tries: int) -> str:
    """The one-line refusal of a min_samples no draw reaches, with the largest value that works."""
    if min_samples * num_clients > n:
        what = (f"data.min_samples ({min_samples}) x federated.num_clients ({num_clients}) exceeds the {n} "
                "samples available")
    else:
        what = (f"data.min_samples: no Dirichlet(alpha={alpha}) partition gave all {num_clients} clients "
                f">= {min_samples} samples in {tries} tries")
    if best == 0:
        return (f"{what}, and each of {tries} Dirichlet(alpha={alpha}) draws leaves some client without a "
                "sample, so no data.min_samples works with these clients; use fewer clients (federated.num_clients), "
                f"raise data.dirichlet_alpha, or use data.partition: iid ({n // num_clients} samples per client)")
    return (f"{what}; the largest data.min_samples that works for this data, federated.num_clients and "
            f"federated.seed is {best}: set data.min_samples <= {best}, use fewer clients, or raise "
            "data.dirichlet_alpha")


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, min_samples: int,
              rng: np.random.Generator, max_tries: int = MAX_TRIES) -> list[np.ndarray]:
    """Label-skewed partition: each class is spread over clients by proportions drawn from Dir(alpha).

    This is the FedML / FedNAS `hetero` partition (Hsu et al., 2019): per class, draw client
    proportions from Dir(alpha), zero them for clients that already hold >= N / num_clients samples
    (FedML's balancing step, which keeps client sizes comparable), and cut the shuffled class
    indices at the cumulative proportions. The whole draw is repeated until every client holds at
    least `min_samples` samples. Smaller alpha gives more skewed label distributions.

    Args:
        labels: one class label per sample.
        num_clients: number of clients (`federated.num_clients`).
        alpha: Dirichlet concentration (`data.dirichlet_alpha`), > 0.
        min_samples: every client gets at least this many samples (`data.min_samples`).
        rng: the only source of randomness.
        max_tries: give up after this many complete redraws.

    Returns:
        One sorted int64 index array per client.

    Raises:
        ValueError: no draw reached min_samples; the message gives the largest value that works
            (`largest_min_samples`), computed from the draws already made.
    """
    labels = _as_labels(labels)
    n = len(labels)
    _check_num_clients(num_clients, n)
    if not alpha > 0:
        raise ValueError(f"data.dirichlet_alpha must be > 0, got {alpha!r}; use e.g. 0.5 (smaller is more non-IID)")
    if min_samples < 0:
        raise ValueError(f"data.min_samples must be >= 0, got {min_samples!r}; set it to 1 or more")
    best, ceiling = 0, n // num_clients
    for attempt, (pieces, sizes) in zip(range(1, max_tries + 1), _dirichlet_draws(labels, num_clients, alpha, rng)):
        smallest = int(sizes.min())
        if smallest >= min_samples:
            if attempt > 1:
                log.debug("dirichlet partition needed %d draws to reach min_samples=%d", attempt, min_samples)
            return _finish(_cut(pieces, sizes))
        best = max(best, smallest)
        if best >= ceiling:  # min_samples > n / num_clients: no draw can do better than this one
            break
    raise ValueError(_min_samples_error(n, num_clients, alpha, min_samples, best, max_tries))


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int,
           rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. (2017): label-sorted shards, a few per client.

    Indices are sorted by label (ties in random order), cut into num_clients * shards_per_client
    near-equal shards, and each client gets shards_per_client shards chosen at random, so most
    clients see at most shards_per_client classes.
    """
    labels = _as_labels(labels)
    n = len(labels)
    _check_num_clients(num_clients, n)
    if not isinstance(shards_per_client, (int, np.integer)) or shards_per_client < 1:
        raise ValueError(f"data.shards_per_client must be an integer >= 1, got {shards_per_client!r}")
    num_shards = num_clients * shards_per_client
    if num_shards > n:
        raise ValueError(f"data.shards_per_client ({shards_per_client}) x federated.num_clients ({num_clients}) "
                         f"exceeds the {n} samples available; lower data.shards_per_client or use fewer clients")
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(order, num_shards)
    owner = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _finish([np.concatenate([pieces[s] for s in row]) for row in owner])


def make_partition(labels: np.ndarray, scheme: str, num_clients: int, seed: int, *, alpha: float = 0.5,
                   min_samples: int = 10, shards_per_client: int = 2) -> list[np.ndarray]:
    """Partition sample indices over clients with `scheme`, using `np.random.default_rng(seed)`.

    Args:
        labels: one class label per sample (the training split).
        scheme: "iid", "dirichlet" or "shards" (`data.partition`).
        num_clients: `federated.num_clients`.
        seed: `federated.seed`; the same seed gives the same partition.
        alpha, min_samples: Dirichlet parameters (`data.dirichlet_alpha`, `data.min_samples`).
        shards_per_client: shards scheme parameter (`data.shards_per_client`).

    Returns:
        One sorted int64 index array per client; every index appears in exactly one of them.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"data.partition: unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = iid(labels, num_clients, rng)
    elif scheme == "dirichlet":
        parts = dirichlet(labels, num_clients, alpha, min_samples, rng)
    else:
        parts = shards(labels, num_clients, shards_per_client, rng)
    sizes = [len(p) for p in parts]
    log.info("partition %s over %d clients: %d..%d samples per client", scheme, num_clients, min(sizes), max(sizes))
    return parts


def split_local(parts: list[np.ndarray], test_fraction: float,
                seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split each client's indices into (local_train, local_test), each client with its own generator.

    Client i shuffles with `np.random.default_rng([seed, i])`, so a client's split does not depend
    on how many other clients exist or in which order they are processed. Every client keeps at
    least one training sample; both halves are returned sorted.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"data.local_test_fraction must be in [0, 1), got {test_fraction!r}")
    if seed < 0:
        raise ValueError(f"federated.seed must be >= 0, got {seed!r}")
    out = []
    for client, given in enumerate(parts):
        part = np.asarray(given, dtype=np.int64)
        if len(part) == 0:
            raise ValueError(f"client {client} has no samples, so it cannot train; lower federated.num_clients "
                             "or raise data.min_samples")
        shuffled = np.random.default_rng([seed, client]).permutation(part)
        n_test = min(round(len(part) * test_fraction), len(part) - 1)
        out.append((np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])))
    return out


def class_counts(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Clients x classes matrix of sample counts (int64), for logging and skew statistics."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for client, part in enumerate(parts):
        counts[client] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return counts


def partition_hash(parts: Sequence[np.ndarray]) -> str:
    """sha256 over each client's length and indices, to detect a changed partition on resume."""
    digest = hashlib.sha256()
    digest.update(np.asarray([len(p) for p in parts], dtype="<i8").tobytes())
    for part in parts:
        digest.update(np.ascontiguousarray(part, dtype="<i8").tobytes())
    return digest.hexdigest()
