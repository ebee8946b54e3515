//! Documentation that must stay true: ARCHITECTURE.md's topic table names
//! every topic of the catalogue.

#[test]
fn architecture_lists_every_topic() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/ARCHITECTURE.md"))
        .expect("ARCHITECTURE.md");
    for spec in switchboard_schemas::topics::topics() {
        assert!(
            doc.contains(&format!("| `{}` |", spec.name)),
            "ARCHITECTURE.md misses topic {}",
            spec.name
        );
    }
}
