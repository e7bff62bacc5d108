//! Ordinary (non-replication) connections to the source database, shared by every loop.

use std::time::Duration;

use tracing::debug;

use crate::error::ServiceError;
use crate::replication::conn::ConnectParams;

/// Opens an ordinary (non-replication) connection and drives it in the background.
pub(crate) async fn connect_ordinary(
    params: &ConnectParams,
) -> Result<tokio_postgres::Client, ServiceError> {
    let cfg = params.to_tokio_postgres();
    let (client, conn) =
        tokio::time::timeout(Duration::from_secs(10), cfg.connect(tokio_postgres::NoTls))
            .await
            .map_err(|_| {
                ServiceError::transient(format!(
                    "no answer from PostgreSQL at {} within 10s",
                    params.redacted()
                ))
            })?
            .map_err(|e| classify_pg_error(&e, params))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!("database connection ended: {e}");
        }
    });
    Ok(client)
}

fn classify_pg_error(e: &tokio_postgres::Error, params: &ConnectParams) -> ServiceError {
    let where_ = params.redacted();
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let class = crate::error::sqlstate_class(code);
            let fix = match code {
                "28P01" => {
                    "; check the password in [source] (url, password or password_file), PGPASSWORD or ~/.pgpass"
                }
                "28000" => "; allow this user, database and address in the server's pg_hba.conf",
                "3D000" => "; fix the database name in [source] url",
                "42501" => "; grant the role the privilege named above",
                _ => "",
            };
            ServiceError::new(class, format!("{} ({where_}){fix}", db.message()))
        }
        None => ServiceError::transient(format!("cannot connect to PostgreSQL at {where_}: {e}")),
    }
}
