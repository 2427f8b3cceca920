"""Run the local endpoint with one worker: `python src/local_endpoint.py [--port 8000]`."""

from local_platform.main import main

if __name__ == "__main__":
    main()
