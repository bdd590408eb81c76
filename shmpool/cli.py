"""shmpool-inspect (being written)."""


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("shmpool-inspect: not yet available")
