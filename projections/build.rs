//! `sqlx::migrate!` embeds the migrations at compile time and tracks the
//! files it read, not the directory: without this, a migration added on its
//! own would be missing from the build until some source changed.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
