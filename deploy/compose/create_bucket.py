"""The compose stack's init step: create the bucket once the S3-compatible store answers.

Runs in the casproxy image (it has boto3) before casproxy starts; a bucket that exists already is
fine, so `docker compose up` can be run again. Exits non-zero, saying why, if the store does not
answer within S3_WAIT seconds or refuses the credentials.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

EXISTS = ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")


def main() -> int:
    endpoint = os.environ["S3_ENDPOINT_URL"]
    bucket = os.environ["S3_BUCKET"]
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=os.environ.get("S3_REGION", "us-east-1"),
        aws_access_key_id=os.environ["S3_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["S3_SECRET_ACCESS_KEY"],
        # We retry ourselves (the store may still be starting); each try should fail fast.
        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + float(os.environ.get("S3_WAIT", "60"))
    while True:
        try:
            if exists(client, bucket):
                print(f"bucket {bucket} is there already at {endpoint}", flush=True)
            else:
                client.create_bucket(Bucket=bucket)
                print(f"created bucket {bucket} at {endpoint}", flush=True)
            return 0
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in EXISTS:  # made meanwhile by someone else
                print(f"bucket {bucket} is there already at {endpoint}", flush=True)
                return 0
            if status < 500:  # wrong keys, a bad name, not ours: waiting will not help
                print(f"cannot create bucket {bucket} at {endpoint}: {error}", file=sys.stderr)
                return 1
            problem = str(error)
        except BotoCoreError as error:  # not listening yet, connection reset, timeout
            problem = str(error)
        if time.monotonic() > deadline:
            print(f"gave up waiting for {endpoint}: {problem}", file=sys.stderr)
            return 1
        time.sleep(1)


def exists(client: Any, bucket: str) -> bool:
    try:
        client.head_bucket(Bucket=bucket)
        return True
    except ClientError as error:
        if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise


if __name__ == "__main__":
    sys.exit(main())
