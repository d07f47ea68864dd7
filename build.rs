//! Compiles the vendored etcd v3 API protos (server and client stubs). Needs `protoc`
//! (Debian: `protobuf-compiler`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Keys and values travel from a put, through the history and out to every watcher:
        // `Bytes` makes each of those hops a reference-count bump instead of a copy.
        .bytes(".")
        .compile_protos(
            &[
                "proto/etcd/api/etcdserverpb/rpc.proto",
                "proto/etcd/api/mvccpb/kv.proto",
                "proto/etcd/api/authpb/auth.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
