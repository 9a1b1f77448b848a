"""Serve every crawl2model flow from this process: deployments without a worker. With a
Prefect server running (`prefect server start`), the UI at http://127.0.0.1:4200 lists them
and can run any of them."""

from prefect import serve

from flows.download import download
from flows.ingest import ingest


def main() -> None:
    serve(download.to_deployment(name="download"), ingest.to_deployment(name="ingest"))


if __name__ == "__main__":
    main()
