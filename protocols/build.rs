//! Generates the agent API's protobuf messages and async ttrpc client and
//! server from `protos/agent.proto` into OUT_DIR.

use std::path::Path;

fn main() {
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    println!("cargo:rerun-if-changed=protos/agent.proto");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out_dir)
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
        .expect("ttrpc code generation for protos/agent.proto failed");
    // The generated files start with inner attributes, which `include!`
    // cannot take; lib.rs declares the allowances on the modules instead.
    for file in ["agent.rs", "agent_ttrpc.rs"] {
        let path = Path::new(&out_dir).join(file);
        let text = std::fs::read_to_string(&path).expect("generated file is readable");
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                !line.trim_start().starts_with("#![") && !line.trim_start().starts_with("//!")
            })
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("generated file is writable");
    }
}
