"""The models: torch networks (``networks``), the serving contract (``scoring``), the streaming
anomaly detector (``detector``), the NAB benchmark (``nab``) and training as a Ray job
(``training``). Other packages import ``models.scoring`` and ``models.networks``; the rest is
reached through ``models.cli``."""
