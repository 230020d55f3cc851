"""One scrape configuration for the whole cluster, and registering endpoints with a Prometheus.

Prometheus finds rtml's endpoints through file service discovery: the files of one folder
(``observability.prometheus_sd_dir``), each a list of targets in the format Ray's dashboard writes
to ``<ray temp dir>/prom_metrics_service_discovery.json``. ``register_cluster`` puts the Ray
cluster's metrics endpoints there (each node's metrics agent: every actor's and replica's metrics,
Ray's own included), ``register_process`` a driver-side process's prometheus-client endpoint.

``SCRAPE_JOB`` is the job to add to Prometheus's ``scrape_configs``; it strips the ``ray_`` prefix
Ray's metrics agent gives application metrics from rtml's, so that a series has one name whichever
process exports it (``observability.metrics``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ray

JOB = "rtml"
# Ray's metrics agent exports ray.util.metrics as ray_<name>: rtml's metrics keep their own names.
METRIC_RELABEL_CONFIGS = [{"source_labels": ["__name__"], "regex": "ray_(rtml_.*)", "target_label": "__name__", "replacement": "$1"}]


def scrape_job(sd_dir: str | Path, interval: str = "5s") -> dict:
    """The ``scrape_configs`` entry that scrapes every endpoint registered in ``sd_dir``."""
    return {
        "job_name": JOB,
        "scrape_interval": interval,
        "file_sd_configs": [{"files": [str(Path(sd_dir) / "*.json")], "refresh_interval": "5s"}],
        "metric_relabel_configs": METRIC_RELABEL_CONFIGS,
    }


def cluster_targets() -> list[str]:
    """host:port of every alive node's metrics agent (needs ``ray.init``)."""
    return sorted(
        f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}" for node in ray.nodes() if node.get("Alive") and node.get("MetricsExportPort")
    )


def register_cluster(sd_dir: str | Path, name: str = "ray-cluster") -> Path:
    """Have the Prometheus watching ``sd_dir`` scrape the Ray cluster's metrics agents; returns the
    file, which ``unregister`` removes. Nodes that join later are added by calling this again."""
    return _write(Path(sd_dir) / f"{name}.json", [{"labels": {"source": "ray"}, "targets": cluster_targets()}])


def register_process(sd_dir: str | Path, name: str, address: str) -> Path:
    """Have the Prometheus watching ``sd_dir`` scrape one process's endpoint ``address`` (host:port)."""
    return _write(Path(sd_dir) / f"{name}.json", [{"labels": {"source": "process", "process": name}, "targets": [address]}])


def link_ray_discovery_file(sd_dir: str | Path, discovery_file: str | Path, name: str = "ray-cluster") -> Path:
    """Point ``sd_dir`` at the service discovery file Ray's dashboard keeps up to date (nodes that
    join or leave are seen without rtml), instead of a snapshot of the nodes."""
    link = Path(sd_dir) / f"{name}.json"
    link.parent.mkdir(parents=True, exist_ok=True)
    staged = link.with_suffix(".link")
    staged.unlink(missing_ok=True)
    staged.symlink_to(Path(discovery_file).resolve())
    os.replace(staged, link)
    return link


def unregister(path: Path) -> None:
    path.unlink(missing_ok=True)


def _write(path: Path, groups: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(".tmp")
    # Written whole then renamed: Prometheus watches the folder and must never read half a file.
    staged.write_text(json.dumps(groups))
    os.replace(staged, path)
    return path
