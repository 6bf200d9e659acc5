"""The image service: BentoML service (service.service:TBCMService), batcher, HTTP API, metrics, load tester."""
