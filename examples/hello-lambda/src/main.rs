//! A function written for AWS Lambda with the `lambda_runtime` crate, as it would be deployed
//! there (a `bootstrap` for the provided.al2023 runtime). fnlet runs it unchanged: it polls the
//! Runtime API that the agent serves inside its sandbox.

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Request {
    name: Option<String>,
}

async fn handler(event: LambdaEvent<Request>) -> Result<Value, Diagnostic> {
    let (req, ctx) = event.into_parts();
    let name = req.name.unwrap_or_else(|| "world".into());
    if name.is_empty() {
        return Err(Diagnostic {
            error_type: "InvalidName".into(),
            error_message: "name must not be empty".into(),
        });
    }
    eprintln!("greeting {name}");
    Ok(json!({ "message": format!("Hello, {name}!"), "request_id": ctx.request_id }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(service_fn(handler)).await
}
