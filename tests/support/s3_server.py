"""A local S3-compatible object store for the tests: moto's standalone server on 127.0.0.1, with IAM
authentication on (a wrong key is refused as AWS refuses it), reached the way a user reaches S3: credentials
and endpoint in the standard environment variables.

The server is a subprocess on a free loopback port; nothing leaves the machine. `S3Server.env()` is what a
user would export; `client()` is a boto3 client for setting up and inspecting the bucket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from acomp.train.distributed import free_port

BUCKET = "corpora"
REGION = "us-east-1"
START_LIMIT_S = 120  # only against a hang: the server normally answers within a second or two
# Inherited settings that would point boto3 elsewhere than the test server, or at real credentials.
AWS_VARIABLES = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)


@dataclass
class S3Server:
    proc: subprocess.Popen
    endpoint: str
    access_key: str
    secret_key: str
    log: Path

    def env(self, **overrides: str) -> dict[str, str]:
        """The variables a user sets to reach this store (streaming's S3_ENDPOINT_URL for the endpoint)."""
        env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata address for credentials
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        env.update(overrides)
        return env

    def apply(self, monkeypatch, **overrides: str) -> None:
        """Set env() in this process (and so in the trainer subprocesses the test helpers start)."""
        for key in AWS_VARIABLES:
            monkeypatch.delenv(key, raising=False)
        for key, value in self.env(**overrides).items():
            monkeypatch.setenv(key, value)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def start_s3_server(log_dir: Path) -> S3Server:
    """Start moto, switch on authentication, create a user with a key allowed everything and the bucket."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = log_dir / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_LIMIT_S
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=5).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto did not start on {endpoint}:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.1)
    # The next 3 requests are the last unauthenticated ones: they create the user, its policy and its key.
    post = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=b"3", method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(post, timeout=30).read()
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    iam.create_user(UserName="acomp")
    allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="acomp", PolicyName="all", PolicyDocument=json.dumps(allow_all))
    key = iam.create_access_key(UserName="acomp")["AccessKey"]
    server = S3Server(proc, endpoint, key["AccessKeyId"], key["SecretAccessKey"], log)
    server.client().create_bucket(Bucket=BUCKET)
    return server
