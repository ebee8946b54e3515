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
    let schema = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
    admin(format!("CREATE SCHEMA {schema}")).await;
    let url = format!("{}?options[search_path]={schema}", postgres_base_url());
    (schema, url)
}

/// Drops a schema made by [`postgres_schema`], with everything in it.
pub async fn drop_postgres_schema(schema: &str) {
    admin(format!("DROP SCHEMA {schema} CASCADE")).await;
}

/// Runs one statement on the test database.
async fn admin(statement: String) {
    let pool = sqlx::PgPool::connect(&postgres_base_url())
        .await
        .expect("PostgreSQL (infra/scripts/postgres.sh start)");
    sqlx::query(sqlx::AssertSqlSafe(statement))
        .execute(&pool)
        .await
        .expect("schema statement");
    pool.close().await;
}
