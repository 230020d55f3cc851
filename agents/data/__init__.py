"""The demo's knowledge for the agents: the sensors' dependency graph (``demo_graph.json``: pumps on
PLCs on a plant, turbines on a SCADA host on a wind farm) and a few past incident reports and
runbooks (``demo_knowledge.jsonl``), loaded into the demo's embedded search index and graph."""

from __future__ import annotations

from pathlib import Path

from rtml.settings import Settings

DATA = Path(__file__).parent
GRAPH_FILE = DATA / "demo_graph.json"
KNOWLEDGE_FILE = DATA / "demo_knowledge.jsonl"


def seed_demo(settings: Settings) -> None:
    """Load the demo's graph and documents into the backends of ``settings`` (before the app opens them)."""
    from agents.dependencies import load_graph_file
    from agents.search import load_documents
    from agents.workers import SearchWorker, load_graph

    load_graph(settings, *load_graph_file(GRAPH_FILE))
    SearchWorker(settings).index(load_documents(KNOWLEDGE_FILE))
