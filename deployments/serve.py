"""Serve every crawl2model flow from this process: deployments without a worker.
`make server` starts a Prefect server and then this; the UI at http://127.0.0.1:4200
lists the deployments and can run any of them."""

from prefect import serve

from flows.ingest import ingest


def main() -> None:
    serve(ingest.to_deployment(name="ingest"))


if __name__ == "__main__":
    main()
