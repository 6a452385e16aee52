#!/usr/bin/env python3
"""Seed SeaweedFS for bench/storage.sh and write presigned SigV4 URLs for wrk.

  storage_s3.py seed ENDPOINT BUCKET OUTDIR GET_OBJECTS PUT_PATHS

Creates BUCKET (path-style, SigV4, the keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY),
uploads GET_OBJECTS objects of 4 KiB and of 1 MiB (get/4k-<i>, get/1m-<i>), and writes, as
path?query lines that wrk appends to http://host:port:
  OUTDIR/s3-get-4k.txt, s3-get-1m.txt   one presigned GET a line (one per object)
  OUTDIR/s3-put-4k.txt, s3-put-1m.txt   PUT_PATHS presigned PUTs each (put/4k-<i>, put/1m-<i>)
Presigned URLs carry UNSIGNED-PAYLOAD, so any body may be sent with them. It then checks one
GET and one PUT of each through the presigned URLs.

  storage_s3.py body SIZE FILE      write the benchmark body (the same bytes as the wrk scripts)
"""
import os
import sys
import urllib.request

SIZES = {"4k": 4096, "1m": 1 << 20}


def body(size):
    chunk = b"basalt-storage-bench-0123456789\n" * 32  # 1 KiB, as in bench/wrk/storage_put.lua
    return chunk * (size // len(chunk)) + b"x" * (size % len(chunk))


def client(endpoint):
    import boto3
    from botocore.config import Config
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"))


def path_query(url):
    rest = url.split("://", 1)[1]
    return rest[rest.index("/"):]


def seed(endpoint, bucket, out, n_get, n_put):
    s3 = client(endpoint)
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception:
        s3.create_bucket(Bucket=bucket)
    ttl = 6 * 3600
    for tag, size in SIZES.items():
        data = body(size)
        gets = []
        for i in range(n_get):
            key = f"get/{tag}-{i}"
            s3.put_object(Bucket=bucket, Key=key, Body=data)
            gets.append(s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=ttl))
        puts = [s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": f"put/{tag}-{i}"}, ExpiresIn=ttl)
                for i in range(n_put)]
        with open(os.path.join(out, f"s3-get-{tag}.txt"), "w") as f:
            f.write("".join(path_query(u) + "\n" for u in gets))
        with open(os.path.join(out, f"s3-put-{tag}.txt"), "w") as f:
            f.write("".join(path_query(u) + "\n" for u in puts))
        # the URLs work as wrk will send them
        got = urllib.request.urlopen(gets[0]).read()
        assert got == data, f"presigned GET {tag}: {len(got)} bytes, expected {size}"
        req = urllib.request.Request(puts[0], data=data, method="PUT",
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req) as r:
            assert r.status == 200, f"presigned PUT {tag}: {r.status}"
        head = s3.head_object(Bucket=bucket, Key=f"put/{tag}-0")
        assert head["ContentLength"] == size, head
    print(f"seeded s3://{bucket}: {n_get} objects of 4 KiB and 1 MiB, {n_put} PUT URLs each", file=sys.stderr)


def main():
    if sys.argv[1] == "seed":
        seed(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    elif sys.argv[1] == "body":
        with open(sys.argv[3], "wb") as f:
            f.write(body(int(sys.argv[2])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
