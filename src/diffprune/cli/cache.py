"""``diffprune cache info|clear``: what the cache holds (encoded latents, text embeddings, FID reference statistics,
teacher samples) and emptying it. Its size is limited by ``DIFFPRUNE_CACHE_MAX`` (default 20G): the least recently
used entries go first."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("cache", help="show or empty the cache (latents, text embeddings, FID statistics, teacher "
                                     "samples)", description=__doc__)
    p.add_argument("action", choices=["info", "clear"], help="info: entries and bytes per kind; clear: remove them")
    p.add_argument("--kind", action="append", default=None, metavar="KIND",
                   help="clear only this kind (latents, text, fid-stats, teacher-samples, latency); repeatable")
    p.add_argument("--cache-dir", default=None,
                   help="the cache folder (default: $DIFFPRUNE_CACHE or ~/.cache/diffprune)")
    p.add_argument("--json", action="store_true", help="info as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from .. import _cache

    if args.action == "clear":
        n = _cache.clear(args.cache_dir, tuple(args.kind or _cache.KINDS))
        print(f"removed {n} cache entr{'y' if n == 1 else 'ies'} from {_cache.cache_dir(args.cache_dir)}")
        return 0
    info = _cache.info(args.cache_dir)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"cache: {info['root']} ({info['total_bytes'] / 2**20:.1f} MiB of {info['limit_bytes'] / 2**30:.1f} GiB, "
          "set DIFFPRUNE_CACHE_MAX to change)")
    for kind, rec in info["kinds"].items():
        print(f"  {kind:<16} {rec['entries']:>5} entries  {rec['bytes'] / 2**20:>9.1f} MiB")
    return 0
