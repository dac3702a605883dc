"""The S3 backend against a real S3 API server (moto in server mode) on 127.0.0.1.

The store contract itself (create once, read back, list layout keys only) runs on every
backend in test_sync.py, and whole rounds run over S3 in test_round.py; here is what is S3's
own.
"""

from __future__ import annotations

import boto3
import pytest

from edgefed.errors import StoreError
from edgefed.sync.layout import manifest_key
from edgefed.sync.s3 import S3Store, parse_s3_url
from edgefed.sync.store import KeyMissing


def test_urls_name_bucket_prefix_and_endpoint_and_bad_ones_are_refused():
    assert parse_s3_url("s3://fed/team-a/run1?endpoint=http://127.0.0.1:9000") == (
        "fed",
        "team-a/run1",
        "http://127.0.0.1:9000",
    )
    assert parse_s3_url("s3://fed") == ("fed", "", None)
    for bad in ("s3:///prefix", "s3://fed/p?region=x", "http://fed/p", "s3://fed/p?endpoint=",
                "s3://fed/p?endpoint=minio.lan:9000"):  # fmt: skip
        with pytest.raises(StoreError, match="not an S3 store URL"):
            parse_s3_url(bad)


def test_prefixes_keep_federations_apart_and_stray_objects_are_ignored(s3_url, s3_endpoint):
    first = S3Store(s3_url)
    second = S3Store(s3_url.replace("/federation?", "/other?"))
    first.create(manifest_key(0, "alice"), b"a")
    second.create(manifest_key(0, "bob"), b"b")
    bucket = S3Store(s3_url).bucket
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_object(Bucket=bucket, Key="federation/rounds/0/alice.json.partial", Body=b"x")
    client.put_object(Bucket=bucket, Key="federation/notes.txt", Body=b"x")
    assert first.keys() == ["rounds/0/alice.json"]
    assert second.keys("rounds/") == ["rounds/0/bob.json"]
    with pytest.raises(KeyMissing):
        first.read(manifest_key(0, "bob"))


def test_missing_bucket_and_dead_endpoint_are_one_clear_store_error(s3_endpoint):
    with pytest.raises(StoreError, match="NoSuchBucket") as missing:
        S3Store(f"s3://no-such-bucket-here/fed?endpoint={s3_endpoint}").keys()
    assert "create the bucket" in missing.value.fix
    with pytest.raises(StoreError, match="cannot list keys"):
        S3Store("s3://fed/x?endpoint=http://127.0.0.1:9").keys()


def test_the_cli_names_a_missing_bucket_and_a_bad_url_in_one_line(s3_endpoint, tiny_llama_gguf):
    from conftest import assert_one_line_error, run

    missing = run("init", f"s3://no-bucket-here/fed?endpoint={s3_endpoint}",
                  "--base", tiny_llama_gguf)  # fmt: skip
    assert_one_line_error(missing, "NoSuchBucket", "create the bucket")
    assert_one_line_error(run("init", "s3://fed/x?region=eu", "--base", tiny_llama_gguf),
                          "not an S3 store URL")  # fmt: skip
