"""The wantel application: the ``wantel`` command and the wiring of the four libraries.

The composition root. It reads configuration (:mod:`wantel.config`), configures logging once
(:mod:`wantel.logs`), and builds and connects what the libraries provide — ``telemetry`` (events,
the log, projections), ``inference`` (instrumented pipelines), ``exporters`` (metrics, spans,
logs, the HTTP app) and ``dashboards`` — into commands (:mod:`wantel.commands`) and a serving
stack (:mod:`wantel.serving`). None of the libraries imports this package.
"""
