//! Operational surface: health and reflection (v1 and v1alpha).

use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::*;

#[tokio::test]
async fn health_reports_serving() {
    let app = TestApp::spawn().await;
    let mut health = HealthClient::new(app.channel().await);
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(overall.status, ServingStatus::Serving as i32);
    let cases = health
        .check(HealthCheckRequest {
            service: "ern_registry.v1.CaseService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cases.status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    let app = TestApp::spawn().await;
    {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut client = ServerReflectionClient::new(app.channel().await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = client
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            resp.next().await.unwrap().unwrap().message_response
        else {
            panic!("expected a service list")
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.contains(&"ern_registry.v1.CaseService".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"grpc.health.v1.Health".to_string()),
            "{names:?}"
        );
    }
    {
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut client = ServerReflectionClient::new(app.channel().await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "ern_registry.v1.CaseService".into(),
            )),
        };
        let mut resp = client
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::FileDescriptorResponse(fd)) =
            resp.next().await.unwrap().unwrap().message_response
        else {
            panic!("expected a file descriptor")
        };
        assert!(!fd.file_descriptor_proto.is_empty());
    }
}
