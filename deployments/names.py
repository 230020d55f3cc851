"""The names of the app's deployments, which modules below ``deployments.app`` (the stream client,
the stream runner) need without importing the app itself."""

ROUTER = "ModelRouter"
INGRESS = "Ingress"
SINK = "PredictionSink"
STREAM = "StreamRunner"


def scorer_name(kind: str) -> str:
    return f"ModelScorer_{kind}"
FORECASTER = "EntityForecaster"
AGENT_GRAPH = "AgentGraph"
