"""Ray Serve serving: per-tenant ensembles of the ``models`` scorers behind one HTTP ingress.

Public faces: ``deployments.app:build_app`` (the Serve application), ``deployments.control``
(deploy, hot-swap promotions, canary/shadow trials, a local cluster for ``rtml up``) and
``deployments.cli`` (the ``rtml up`` command). Inside: ``ingress`` (HTTP) -> ``router``
(ensembles, feedback, health) -> ``scorer`` (one deployment per model kind); ``ensemble`` is the
ensemble logic without Ray, ``wire`` the HTTP formats, ``store`` the router's way to the lakehouse.

Other packages reach the router through a Serve handle, e.g. stream consumers:
``serve.get_deployment_handle("ModelRouter", app_name).score.remote(rtml.schemas.ScoreRequest(...))``
(``deployments.stream_client``).
"""
