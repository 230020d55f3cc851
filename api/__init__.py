"""The HTTP-facing API: event ingestion (``api.ingest``: what ``POST /v1/events`` and
``/v1/events/binary`` do once the Ingress has read a request) and the GraphQL schema.

GraphQL: ``api.graphql.graphql_app(access, settings)`` is the ASGI app the Ingress mounts at
``/graphql``, serving ``api.schema`` (graphene) over the data layer ``api.data`` (``DataAccess``,
scoped per request to the tenant ``api.tenancy.caller_tenant`` finds), which asks the running app
for what goes through the routers through ``api.operations.Operations``."""
