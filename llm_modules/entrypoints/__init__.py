"""What users run: the command line (`cli`) and the OpenAI-compatible server (`openai`)."""
