//! Test and benchmark support (not part of the server): a PostgreSQL schema
//! of one's own in the test database.

/// The test database: `SWITCHBOARD_TEST_POSTGRES`, or the `switchboard_test`
/// database of `infra/scripts/postgres.sh`.
pub fn postgres_base_url() -> String {
    std::env::var("SWITCHBOARD_TEST_POSTGRES").unwrap_or_else(|_| {
        "postgres://switchboard:switchboard@127.0.0.1:5432/switchboard_test".to_owned()
    })
}

/// Creates the schema `{prefix}_{uuid}` in the test database and returns
/// its name and a URL whose connections use it (`search_path`). Panics when
/// PostgreSQL is not there: the suites that call this need it.
pub async fn postgres_schema(prefix: &str) -> (String, String) {
    let base = postgres_base_url();
    let schema = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
    let admin = sqlx::PgPool::connect(&base)
        .await
        .expect("PostgreSQL (infra/scripts/postgres.sh start)");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .expect("create schema");
    admin.close().await;
    let url = format!("{base}?options[search_path]={schema}");
    (schema, url)
}

/// Drops a schema made by [`postgres_schema`], with everything in it.
pub async fn drop_postgres_schema(schema: &str) {
    let admin = sqlx::PgPool::connect(&postgres_base_url())
        .await
        .expect("PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&admin)
        .await
        .expect("drop schema");
    admin.close().await;
}
