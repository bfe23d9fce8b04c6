// Inference on Azure Container Apps serverless GPUs: the shared environment (environment.bicep)
// and a Container App that runs infra/serve.sh from the workspace on the mounted file share.
// Its HTTPS endpoint requires an API key. Deploy with `python infra/remote.py provision-inference`.

@description('Azure region of every resource.')
param location string = resourceGroup().location

@description('Lowercase letters, digits and hyphens; the start of every resource name.')
@minLength(1)
@maxLength(20)
param namePrefix string

@description('Serverless GPU workload profile type.')
@allowed([
  'Consumption-GPU-NC8as-T4'
  'Consumption-GPU-NC24-A100'
])
param gpuProfile string

@description('Container image with Python 3.11 and bash, pinned to a version; torch and the CUDA libraries come from setup/requirements-cuda.txt.')
param image string

@description('Azure Files share that holds the workspace.')
param shareName string = 'workspace'

@description('Share quota in GiB.')
@minValue(100)
@maxValue(5120)
param shareQuotaGiB int = 1024

@description('Port the server listens on inside the container.')
param port int = 7860

@description('Replicas kept running when idle: 0 saves the GPU cost, 1 avoids cold starts.')
@minValue(0)
@maxValue(1)
param minReplicas int = 0

@description('Environment variable through which the server reads its API key (settings.toml [serve] api_key_env).')
param apiKeyEnvName string = 'FINETUNE_API_KEY'

@description('API key every request must carry. Stored only as a Container Apps secret.')
@secure()
@minLength(16)
param apiKey string

var apiKeySecretName = 'api-key'
var gpuProfileName = 'gpu'
var mountPath = '/mount'
var cpu = gpuProfile == 'Consumption-GPU-NC24-A100' ? 24 : 8
var memory = gpuProfile == 'Consumption-GPU-NC24-A100' ? '220Gi' : '56Gi'

module env 'environment.bicep' = {
  name: 'environment'
  params: {
    location: location
    namePrefix: namePrefix
    gpuProfile: gpuProfile
    gpuProfileName: gpuProfileName
    shareName: shareName
    shareQuotaGiB: shareQuotaGiB
  }
}

resource app 'Microsoft.App/containerApps@2025-07-01' = {
  name: 'app-${namePrefix}'
  location: location
  properties: {
    environmentId: env.outputs.environmentId
    workloadProfileName: gpuProfileName
    configuration: {
      activeRevisionsMode: 'Single'
      ingress: {
        external: true
        targetPort: port
        transport: 'auto'
        // HTTPS only: plain HTTP is refused, not redirected.
        allowInsecure: false
      }
      secrets: [
        {
          name: apiKeySecretName
          value: apiKey
        }
      ]
    }
    template: {
      containers: [
        {
          name: 'inference'
          image: image
          command: [
            'bash'
            '${mountPath}/infra/serve.sh'
          ]
          resources: {
            cpu: cpu
            memory: memory
          }
          env: [
            {
              name: apiKeyEnvName
              secretRef: apiKeySecretName
            }
            {
              name: 'PORT'
              value: string(port)
            }
            {
              name: 'PIP_CACHE_DIR'
              value: '${mountPath}/.cache/pip'
            }
            {
              name: 'HF_HOME'
              value: '${mountPath}/.cache/huggingface'
            }
            {
              name: 'PYTHONUNBUFFERED'
              value: '1'
            }
          ]
          // TCP probes: every HTTP route needs the API key. Installing packages and loading the
          // model takes minutes, so the startup probe allows up to 60 + 10 x 240 seconds.
          probes: [
            {
              type: 'Startup'
              tcpSocket: {
                port: port
              }
              initialDelaySeconds: 60
              periodSeconds: 240
              failureThreshold: 10
            }
            {
              type: 'Liveness'
              tcpSocket: {
                port: port
              }
              periodSeconds: 30
              failureThreshold: 3
            }
          ]
          volumeMounts: [
            {
              volumeName: 'workspace'
              mountPath: mountPath
            }
          ]
        }
      ]
      scale: {
        minReplicas: minReplicas
        maxReplicas: 1
      }
      volumes: [
        {
          name: 'workspace'
          storageType: 'AzureFile'
          storageName: env.outputs.storageLinkName
          mountOptions: 'mfsymlinks,nobrl'
        }
      ]
    }
  }
}

// Saved by remote.py to infra/inference.config.json (the AI Toolkit's field names).
output SUBSCRIPTION_ID string = subscription().subscriptionId
output RESOURCE_GROUP_NAME string = resourceGroup().name
output STORAGE_ACCOUNT_NAME string = env.outputs.storageAccountName
output FILE_SHARE_NAME string = env.outputs.shareName
output ACA_APP_NAME string = app.name
output ACA_APP_ENDPOINT string = 'https://${app.properties.configuration.ingress.fqdn}'
