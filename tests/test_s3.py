"""The S3 backend (--storage s3://BUCKET/PREFIX) against a real S3 server: SeaweedFS's
`weed mini` on 127.0.0.1 (the seaweed fixture)."""

import concurrent.futures

import botocore.exceptions
import pytest

# -- the test server does what the backend relies on ------------------------------------


def test_the_test_server_is_ready_and_keeps_create_only_writes(seaweed):
    client = seaweed.client()
    key = "server-check/create-only"
    client.put_object(Bucket="relay", Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        client.put_object(Bucket="relay", Key=key, Body=b"second", IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket="relay", Key=key)["Body"].read() == b"first"
    client.delete_object(Bucket="relay", Key=key)


def test_the_test_server_lets_one_of_racing_compare_and_swaps_win(seaweed):
    client = seaweed.client()
    key = "server-check/counter"
    etag = client.put_object(Bucket="relay", Key=key, Body=b"0")["ETag"]

    def swap(value: int) -> bool:
        try:
            seaweed.client().put_object(Bucket="relay", Key=key, Body=str(value).encode(), IfMatch=etag)
            return True
        except botocore.exceptions.ClientError as exc:
            assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 412
            return False

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        won = list(pool.map(swap, range(1, 9)))
    assert won.count(True) == 1
    assert client.get_object(Bucket="relay", Key=key)["Body"].read() == str(won.index(True) + 1).encode()
    client.delete_object(Bucket="relay", Key=key)
