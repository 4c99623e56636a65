"""Operations: Prometheus metrics, the ``kvtier serve`` control service, ``kvtier top``."""
