"""The REST service: registry, merge jobs and artifacts over the merge engine. Never imports torch."""
